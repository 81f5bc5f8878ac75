"""The built-in offline task: a multiple-choice cloze made from the built-in text.

Each item is a context of ``CONTEXT_WORDS`` words of ``pydoc_data.topics`` prose, its true
continuation (the next ``CHOICE_WORDS`` words) and three continuations of the same length
taken from far away in the text (at least ``MIN_DISTANCE`` words from the context). A model
scores each choice by the log-likelihood of ``" " + choice`` after the context
(lm-eval-harness ``multiple_choice``); chance is 25 %. Items are made from the second half
of the text, which the default calibration windows (its first few thousand tokens) never
reach, and are the same on every machine: words come from ``str.split`` (whitespace
collapsed, so no tokenizer is involved) and positions from ``random.Random(seed)``.

The task is written as lm-eval task files (a YAML with ``dataset_path: json`` and a JSONL
file) into a cache folder and registered with ``TaskManager(include_path=...)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

from depthprobe.data import builtin_text

TASK_NAME = "depthprobe_cloze"
NUM_ITEMS = 500
CONTEXT_WORDS = 48
CHOICE_WORDS = 8
NUM_CHOICES = 4
MIN_DISTANCE = 2000
SEED = 0
VERSION = 1


def cloze_items(text: str | None = None, num_items: int = NUM_ITEMS, seed: int = SEED) -> list[dict]:
    """The cloze items: ``{"context", "choices" (4 strings), "label" (index of the truth)}``.

    Item ``i`` starts its continuation at an evenly spaced word position of the second half
    of ``text`` (default the built-in text); the truth's place among the choices and the
    three distractor positions are drawn from ``random.Random(seed)``.
    """
    words = (text if text is not None else builtin_text()).split()
    first = max(len(words) // 2, CONTEXT_WORDS)
    last = len(words) - CHOICE_WORDS
    if last - first < num_items or len(words) < 2 * MIN_DISTANCE + CHOICE_WORDS:
        raise ValueError(f"text of {len(words)} words is too short for {num_items} cloze items")
    rng = random.Random(seed)
    step = (last - first) / num_items
    items = []
    for i in range(num_items):
        pos = first + int(i * step)
        truth = " ".join(words[pos : pos + CHOICE_WORDS])
        choices = [truth]
        while len(choices) < NUM_CHOICES:
            other = rng.randrange(0, last)
            candidate = " ".join(words[other : other + CHOICE_WORDS])
            if abs(other - pos) >= MIN_DISTANCE and candidate not in choices:
                choices.append(candidate)
        label = rng.randrange(NUM_CHOICES)
        choices[0], choices[label] = choices[label], choices[0]
        items.append({"context": " ".join(words[pos - CONTEXT_WORDS : pos]), "choices": choices, "label": label})
    return items


def task_yaml(data_file: Path, name: str = TASK_NAME) -> str:
    """lm-eval task config for a JSONL file of cloze items (``context``, ``choices``, ``label``)."""
    return "\n".join([
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data_file))}",
        "test_split: test",
        "output_type: multiple_choice",
        "doc_to_text: context",
        "doc_to_choice: choices",
        "doc_to_target: label",
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        f"  version: {VERSION}.0",
        "",
    ])


def cache_root() -> Path:
    """``$DEPTHPROBE_CACHE`` (default ``~/.cache/depthprobe``), or a temp folder when the cache is off."""
    root = os.environ.get("DEPTHPROBE_CACHE", str(Path.home() / ".cache" / "depthprobe"))
    if root.lower() in ("off", "0", "false", ""):
        root = os.path.join(os.environ.get("TMPDIR", "/tmp"), "depthprobe-cache")
    return Path(root).expanduser()


def task_dir() -> Path:
    """Folder holding the built-in task's YAML and JSONL (written once, reused).

    Under ``$DEPTHPROBE_CACHE/tasks`` (default ``~/.cache/depthprobe``), or a temp folder
    when the cache is off; the name carries a hash of the items, so a changed text or
    builder never reuses stale files.
    """
    items = cloze_items()
    blob = "\n".join(json.dumps(item, sort_keys=True) for item in items) + "\n"
    key = hashlib.sha256(blob.encode()).hexdigest()[:12]
    folder = cache_root() / "tasks" / f"{TASK_NAME}-{key}"
    if not (folder / f"{TASK_NAME}.yaml").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        data = folder / f"{TASK_NAME}.jsonl"
        data.write_text(blob, encoding="utf-8")
        (folder / f"{TASK_NAME}.yaml").write_text(task_yaml(data), encoding="utf-8")
    return folder
