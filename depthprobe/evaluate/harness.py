"""lm-evaluation-harness on models that are already loaded (GGUF, pruned folders, hub ids).

:func:`evaluate_model` wraps the loaded model in lm-eval's ``HFLM`` and calls
``simple_evaluate``; the result is a tidy table (``model, task, metric, value, stderr``)
plus per-document metric values, from which :func:`retention` computes each model's score
as a fraction of the first model's, with a paired bootstrap interval over documents
(the same documents resampled for both models).

Task specs (:func:`resolve_tasks`): ``depthprobe_cloze`` (built in, offline), a path to a
user's task YAML (its folder is registered with lm-eval), or an lm-eval task name (needs
its dataset: network or a local ``datasets`` cache).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from depthprobe.errors import DepthprobeError
from depthprobe.evaluate import recall
from depthprobe.evaluate.cloze import TASK_NAME, task_dir
from depthprobe.model.load import load_model
from depthprobe.stats import DEFAULT_BOOT, DEFAULT_LEVEL, bootstrap_indices, percentile_interval

log = logging.getLogger(__name__)

#: built-in offline tasks: name -> the folder of their lm-eval files (written on first use)
BUILTIN_TASKS = {TASK_NAME: task_dir, recall.TASK_NAME: recall.task_dir}
OFFLINE_TASK_HINT = (f"offline, use the built-in tasks ({TASK_NAME}: likelihood, {recall.TASK_NAME}: generation) "
                     "or a local task file "
                     "(--tasks path/to/task.yaml with dataset_path: json and a local data file)")
EVAL_COLUMNS = ["model", "task", "metric", "value", "stderr"]


@dataclass
class TaskSpec:
    """Task names for lm-eval and the folders it must index to find them."""

    names: list[str]
    include_paths: list[str] = field(default_factory=list)
    needs_registry: bool = False  # a name from lm-eval's own task registry


class _AnyTagLoader(yaml.SafeLoader):
    """Safe YAML loader that reads lm-eval's ``!function`` (and any other tag) as a string."""


_AnyTagLoader.add_multi_constructor("!", lambda loader, suffix, node: loader.construct_scalar(node)
                                   if isinstance(node, yaml.ScalarNode) else None)


def read_task_yaml(path: str | Path) -> str:
    """The task (or group) name a user's task YAML defines; one-line errors for bad files."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DepthprobeError(f"task file not found: {path}")
    try:
        config = yaml.load(p.read_text(encoding="utf-8"), Loader=_AnyTagLoader)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise DepthprobeError(f"task file {path} is not valid YAML{line}: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(config, dict):
        raise DepthprobeError(f"task file {path} must be a YAML mapping with a 'task:' name")
    name = config.get("task") or config.get("group")
    if not isinstance(name, str) or not name:
        raise DepthprobeError(f"task file {path} has no 'task:' name")
    return name


def resolve_tasks(specs: str | list[str]) -> TaskSpec:
    """``"depthprobe_cloze,path/to/task.yaml,hellaswag"`` -> names and folders to index."""
    items = [s.strip() for s in (specs.split(",") if isinstance(specs, str) else specs) if s.strip()]
    if not items:
        raise DepthprobeError(f"--tasks needs at least one task, e.g. --tasks {TASK_NAME}")
    spec = TaskSpec([])
    for item in items:
        if item in BUILTIN_TASKS:
            folder = str(BUILTIN_TASKS[item]())
            spec.names.append(item)
        elif item.endswith((".yaml", ".yml")):
            spec.names.append(read_task_yaml(item))
            folder = str(Path(item).expanduser().resolve().parent)
        else:
            spec.names.append(item)
            spec.needs_registry = True
            continue
        if folder not in spec.include_paths:
            spec.include_paths.append(folder)
    return spec


def task_manager(spec: TaskSpec):
    """lm-eval ``TaskManager`` over the spec's folders (and lm-eval's own tasks when named);
    unknown names fail here in one line, before any model runs."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=spec.include_paths or None, include_defaults=spec.needs_registry)
    known = set(manager.all_tasks)
    unknown = [n for n in spec.names if n not in known]
    if unknown:
        raise DepthprobeError(f"unknown task {', '.join(unknown)}: not an lm-eval task name or task file; "
                              f"{OFFLINE_TASK_HINT}")
    return manager


def load_tasks(manager, spec: TaskSpec) -> dict:
    """Build the tasks (reads their datasets); a dataset that cannot be reached is one line.
    Called before any model loads, so a missing dataset fails fast (``datasets`` caches it)."""
    try:
        return manager.load(spec.names)
    except (ConnectionError, OSError, ValueError, KeyError) as exc:
        raise DepthprobeError(f"cannot load task(s) {', '.join(spec.names)}: {str(exc).splitlines()[0][:200]}; "
                              f"{OFFLINE_TASK_HINT}") from exc


@dataclass
class EvalOutput:
    """One model's scores: the tidy table and, per task, each document's metric values."""

    table: pd.DataFrame  # EVAL_COLUMNS
    samples: dict[str, pd.DataFrame]  # task -> columns doc_id, <metric>...


def evaluate_model(model, tokenizer, tasks: TaskSpec | str | list[str], *, label: str, limit: int | None = None,
                   num_fewshot: int | None = None, batch_size: int = 8, manager=None) -> EvalOutput:
    """Run lm-eval's ``simple_evaluate`` on an already-loaded causal LM.

    ``limit``: the first ``limit`` documents of each task (lm-eval's own option).

    Example:
        >>> model, tok = depthprobe.load_model("smollm2")                                  # doctest: +SKIP
        >>> evaluate_model(model, tok, "depthprobe_cloze", label="smollm2", limit=50).table  # doctest: +SKIP
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    check_limit(limit)
    spec = tasks if isinstance(tasks, TaskSpec) else resolve_tasks(tasks)
    manager = manager or task_manager(spec)
    if num_fewshot is not None and num_fewshot < 0:
        raise DepthprobeError(f"--num-fewshot must be 0 or more (got {num_fewshot})")
    device = str(next(model.parameters()).device)
    # lm-eval scores an empty context after BOS (else EOS); a tokenizer with neither gets pad / 0
    extra = {}
    if getattr(tokenizer, "bos_token_id", None) is None and getattr(tokenizer, "eos_token_id", None) is None:
        extra["prefix_token_id"] = getattr(tokenizer, "pad_token_id", None) or 0
    lm = HFLM(pretrained=model, tokenizer=_with_eos(tokenizer, model), batch_size=batch_size, device=device, **extra)
    try:
        results = simple_evaluate(lm, tasks=spec.names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                  log_samples=True, bootstrap_iters=1000)
    except (ConnectionError, FileNotFoundError, KeyError, ValueError) as exc:
        raise DepthprobeError(f"cannot run task(s) {', '.join(spec.names)}: {str(exc).splitlines()[0][:200]}; "
                              f"{OFFLINE_TASK_HINT}") from exc
    return EvalOutput(results_table(results, label), samples_tables(results))


def _with_eos(tokenizer, model):
    """lm-eval's ``generate_until`` stops at the tokenizer's EOS and fails without one: a tokenizer
    that has none gets (in a copy) the model's ``eos_token_id``, else its pad token, as EOS."""
    if getattr(tokenizer, "eos_token_id", None) is not None:
        return tokenizer
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if eos is not None else getattr(model.config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    eos = eos if isinstance(eos, int) else getattr(tokenizer, "pad_token_id", None)
    if eos is None:
        return tokenizer
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    return tokenizer


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise DepthprobeError(f"--limit must be at least 1 document per task (got {limit}); omit it for all")


def results_table(results: dict, label: str) -> pd.DataFrame:
    """``simple_evaluate``'s ``results`` as rows ``model, task, metric, value, stderr``."""
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"model": label, "task": task, "metric": metric if filt == "none" else f"{metric},{filt}",
                         "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else np.nan})
    return pd.DataFrame(rows, columns=EVAL_COLUMNS)


def samples_tables(results: dict) -> dict[str, pd.DataFrame]:
    """Per task, one row per document: ``doc_id`` and each numeric metric's value."""
    tables = {}
    for task, samples in (results.get("samples") or {}).items():
        rows = []
        for s in samples:
            names = s.get("metrics") or []
            rows.append({"doc_id": s["doc_id"], **{m: float(s[m]) for m in names
                                                   if isinstance(s.get(m), (int, float))}})
        tables[task] = pd.DataFrame(rows).sort_values("doc_id").reset_index(drop=True)
    return tables


def retention(outputs: list[EvalOutput], n_boot: int = DEFAULT_BOOT, level: float = DEFAULT_LEVEL,
              seed: int = 0) -> pd.DataFrame:
    """Each model's score as a fraction of the first model's, per task and metric.

    ``retention = value_model / value_reference``; the interval is a paired percentile
    bootstrap over documents: each resample draws documents with replacement and takes the
    ratio of the two models' means over the same drawn documents. Columns: ``model,
    reference, task, metric, value, reference_value, retention, retention_low,
    retention_high``.
    """
    if len(outputs) < 2:
        return pd.DataFrame(columns=["model", "reference", "task", "metric", "value", "reference_value",
                                     "retention", "retention_low", "retention_high"])
    ref = outputs[0]
    ref_label = ref.table["model"].iloc[0]
    rows = []
    for out in outputs[1:]:
        for row in out.table.itertuples(index=False):
            match = ref.table[(ref.table.task == row.task) & (ref.table.metric == row.metric)]
            if match.empty:
                continue
            ref_value = float(match["value"].iloc[0])
            lo, hi = _ratio_interval(ref.samples.get(row.task), out.samples.get(row.task), row.metric,
                                     n_boot, level, seed)
            rows.append({"model": row.model, "reference": ref_label, "task": row.task, "metric": row.metric,
                         "value": row.value, "reference_value": ref_value,
                         "retention": row.value / ref_value if ref_value else np.nan,
                         "retention_low": lo, "retention_high": hi})
    return pd.DataFrame(rows)


def _ratio_interval(ref: pd.DataFrame | None, other: pd.DataFrame | None, metric: str, n_boot: int,
                    level: float, seed: int) -> tuple[float, float]:
    """Paired bootstrap interval of mean(other)/mean(ref) over shared documents (NaN if none)."""
    if ref is None or other is None or metric not in ref or metric not in other:
        return np.nan, np.nan
    paired = ref[["doc_id", metric]].merge(other[["doc_id", metric]], on="doc_id", suffixes=("_ref", "_other"))
    if paired.empty:
        return np.nan, np.nan
    a = paired[f"{metric}_ref"].to_numpy(float)
    b = paired[f"{metric}_other"].to_numpy(float)
    idx = bootstrap_indices(len(a), n_boot, seed)
    den = a[idx].mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(den > 0, b[idx].mean(1) / den, np.nan)
    lo, hi = percentile_interval(ratios, level)
    return float(lo), float(hi)


def evaluate_sources(sources: list[str], tasks: str | list[str], *, limit: int | None = None,
                     num_fewshot: int | None = None, batch_size: int = 8, labels: list[str] | None = None,
                     **load_kwargs) -> list[EvalOutput]:
    """Load each model in turn (``depthprobe.load_model``), evaluate it, free it.

    Task names and ``limit`` are checked before any model is loaded.
    """
    check_limit(limit)
    spec = resolve_tasks(tasks)
    manager = task_manager(spec)
    load_tasks(manager, spec)
    outputs = []
    for i, source in enumerate(sources):
        model, tokenizer = load_model(source, **load_kwargs)
        label = labels[i] if labels else source
        outputs.append(evaluate_model(model, tokenizer, spec, label=label, limit=limit, num_fewshot=num_fewshot,
                                      batch_size=batch_size, manager=manager))
        del model
    return outputs


def combined(outputs: list[EvalOutput]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(``eval.csv`` table of all models, per-document ``eval_samples.csv`` table)."""
    table = pd.concat([o.table for o in outputs], ignore_index=True)
    samples = [frame.assign(model=o.table["model"].iloc[0], task=task)
               for o in outputs if not o.table.empty for task, frame in o.samples.items()]
    samples = pd.concat(samples, ignore_index=True) if samples else pd.DataFrame(columns=["model", "task", "doc_id"])
    first = ["model", "task", "doc_id"]
    return table, samples[first + [c for c in samples.columns if c not in first]]


def write_eval(out_dir: str | Path, outputs: list[EvalOutput]) -> Path:
    """``eval.csv``, ``eval_samples.csv`` and (two or more models) ``eval_retention.csv``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table, samples = combined(outputs)
    table.to_csv(out / "eval.csv", index=False, float_format="%.10g")
    samples.to_csv(out / "eval_samples.csv", index=False, float_format="%.10g")
    if len(outputs) > 1:
        retention(outputs).to_csv(out / "eval_retention.csv", index=False, float_format="%.10g")
    return out
