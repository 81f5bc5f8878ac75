"""The built-in offline generative task ``depthprobe_recall``: greedy decoding, scored by exact
match and token F1.

Each item is a passage of ``PASSAGE_WORDS`` words of the built-in text (its second half, which
the default calibration windows never reach), then a blank line and the
``CUE_WORDS`` words of a span of the passage again; the model must go on
with the next ``ANSWER_WORDS`` words, which it has seen in the passage. Recalling a span
from the context is what induction (attention) does, so the task asks generation of exactly
the part that sublayer pruning removes. Generation is greedy (``do_sample: false``) and stops
at a newline; the first ``ANSWER_WORDS`` words generated are scored:

    exact_match = 1 if they equal the answer's words, else 0
    token_f1    = 2·P·R / (P + R) over the bag of words (P: share of generated words in the
                  answer, R: share of answer words generated)

The trivial baseline (:func:`trivial_baseline`) answers every item with the text's
``ANSWER_WORDS`` most frequent words; its exact match is 0. Items, like the cloze's, are the
same on every machine (``str.split`` words, ``random.Random(seed)`` positions) and are written
as lm-eval task files (``output_type: generate_until``) under the depthprobe cache.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

from depthprobe.data import builtin_text
from depthprobe.evaluate.cloze import cache_root

TASK_NAME = "depthprobe_recall"
NUM_ITEMS = 200
PASSAGE_WORDS = 40
CUE_WORDS = 6
ANSWER_WORDS = 6
SEED = 0
VERSION = 1


def recall_items(text: str | None = None, num_items: int = NUM_ITEMS, seed: int = SEED) -> list[dict]:
    """``{"prompt", "answer"}`` items: passage, blank line, cue; the answer follows the cue in the passage."""
    words = (text if text is not None else builtin_text()).split()
    first, last = len(words) // 2, len(words) - PASSAGE_WORDS
    if last - first < num_items:
        raise ValueError(f"text of {len(words)} words is too short for {num_items} recall items")
    rng = random.Random(seed)
    step = (last - first) / num_items
    items = []
    for i in range(num_items):
        passage = words[first + int(i * step): first + int(i * step) + PASSAGE_WORDS]
        start = rng.randrange(0, PASSAGE_WORDS - CUE_WORDS - ANSWER_WORDS + 1)
        cue = passage[start: start + CUE_WORDS]
        answer = passage[start + CUE_WORDS: start + CUE_WORDS + ANSWER_WORDS]
        items.append({"prompt": " ".join(passage) + "\n\n" + " ".join(cue), "answer": " ".join(answer)})
    return items


def _words(text: str) -> list[str]:
    return str(text).split()


def token_f1(prediction: str, answer: str) -> float:
    """Bag-of-words F1 of the prediction's first ``len(answer)`` words against the answer."""
    gold = _words(answer)
    pred = _words(prediction)[: len(gold)]
    common = sum((Counter(pred) & Counter(gold)).values())
    if not common:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, answer: str) -> float:
    gold = _words(answer)
    return float(_words(prediction)[: len(gold)] == gold)


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval's per-document hook (``process_results: !function recall_utils.process_results``)."""
    prediction = results[0] if results else ""
    return {"exact_match": exact_match(prediction, doc["answer"]), "token_f1": token_f1(prediction, doc["answer"])}


def trivial_baseline(items: list[dict] | None = None, text: str | None = None) -> dict[str, float]:
    """Scores of answering every item with the text's most frequent words (exact match 0)."""
    items = items if items is not None else recall_items()
    common = " ".join(w for w, _ in Counter((text if text is not None else builtin_text()).split())
                      .most_common(ANSWER_WORDS))
    return {"exact_match": sum(exact_match(common, it["answer"]) for it in items) / len(items),
            "token_f1": sum(token_f1(common, it["answer"]) for it in items) / len(items)}


#: the scoring module lm-eval imports from the task folder: depthprobe's own functions
UTILS = '''"""depthprobe_recall scoring (written by depthprobe): see depthprobe.evaluate.recall."""
from depthprobe.evaluate.recall import process_results  # noqa: F401
'''


def task_yaml(data_file: Path, name: str = TASK_NAME) -> str:
    return "\n".join([
        f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {json.dumps(str(data_file))}",
        "test_split: test", "output_type: generate_until", "doc_to_text: prompt", "doc_to_target: answer",
        "generation_kwargs:", '  until: ["\\n"]', "  do_sample: false", f"  max_gen_toks: {4 * ANSWER_WORDS}",
        "process_results: !function recall_utils.process_results", "metric_list:",
        "  - metric: exact_match", "    aggregation: mean", "    higher_is_better: true",
        "  - metric: token_f1", "    aggregation: mean", "    higher_is_better: true",
        "metadata:", f"  version: {VERSION}.0", ""])


def task_dir() -> Path:
    """Folder with the task's YAML, JSONL and scoring module (written once, keyed by a hash)."""
    blob = "\n".join(json.dumps(item, sort_keys=True) for item in recall_items()) + "\n"
    key = hashlib.sha256((blob + UTILS).encode()).hexdigest()[:12]
    folder = cache_root() / "tasks" / f"{TASK_NAME}-{key}"
    if not (folder / f"{TASK_NAME}.yaml").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        data = folder / f"{TASK_NAME}.jsonl"
        data.write_text(blob, encoding="utf-8")
        (folder / "recall_utils.py").write_text(UTILS, encoding="utf-8")
        (folder / f"{TASK_NAME}.yaml").write_text(task_yaml(data), encoding="utf-8")
    return folder
