"""The run-folder layout: every file and folder name depthprobe writes, and where a run's
analysis and model are. The bottom of the package (no torch, no pandas): the model loader,
the results, the CLI and the report all read the layout from here.

``analyze --out`` (see :mod:`depthprobe.results` for the columns):

- ``layers.csv``, ``angular_distance.csv``, ``summary.json`` and any extra tables an
  analysis adds (``block_drop.csv``, ``proxies.csv``, ...); ``report.html``.
- ``drop_progress.jsonl``: the drop sweep's finished batches while it runs (resume).

Other commands' folders:

- ``prune --out``: the pruned model, ``prune.json``, ``prune_curve.csv``, ``prune_excess.csv``
  and ``analysis/`` (an analyze folder).
- ``train --out``: ``metrics.csv``, ``train_layers.csv``, ``model/`` and ``analysis/``.
- ``compare --out``: ``comparison.csv``, ``comparison_summary.csv`` and one training folder
  per variant and seed, ``<variant>/seed<seed>/`` (:func:`seed_dir`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from depthprobe.errors import DepthprobeError

LAYERS_CSV = "layers.csv"
ANGULAR_CSV = "angular_distance.csv"
SUMMARY_JSON = "summary.json"
REPORT_HTML = "report.html"
DROP_PROGRESS = "drop_progress.jsonl"
ORIGINAL_DIR = "original"  # in a prune folder: the analysis of the model the blocks were chosen from
ANALYSIS_DIR = "analysis"  # the analyze folder inside a prune or train folder
MODEL_DIR = "model"  # the trained model inside a train folder
PRUNE_JSON = "prune.json"
PRUNE_CURVE_CSV = "prune_curve.csv"
PRUNE_EXCESS_CSV = "prune_excess.csv"
COMPARISON_CSV = "comparison.csv"
COMPARISON_SUMMARY_CSV = "comparison_summary.csv"
#: tables a prune or train folder keeps beside its ``analysis/`` folder
SIDE_TABLES = ("prune_curve", "prune_excess", "metrics", "train_layers", "eval", "eval_retention", "bench",
               "bench_speedup", "repair_curve")


def analysis_dir(path: str | Path) -> Path:
    """The folder holding ``layers.csv`` and ``summary.json`` of any depthprobe run folder:
    the folder itself (``analyze --out``) or its ``analysis/`` (``prune --out``, ``train --out``).

    A ``compare --out`` folder holds one run per variant and seed: the error names one.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise DepthprobeError(f"run folder not found: {path}")
    for candidate in (folder, folder / ANALYSIS_DIR):
        if (candidate / LAYERS_CSV).is_file() and (candidate / SUMMARY_JSON).is_file():
            return candidate
    seeds = sorted(folder.glob(f"*/seed*/{ANALYSIS_DIR}"))
    if (folder / COMPARISON_CSV).is_file() and seeds:
        raise DepthprobeError(f"{path} is a `depthprobe compare` folder with one run per variant and seed; "
                              f"pass one of them, e.g. {seeds[0].parent}")
    if (folder / MODEL_DIR / "config.json").is_file():
        raise DepthprobeError(f"{path} is a training run without an analysis (trained with --no-report?); "
                              f"run `depthprobe analyze {path} --out {folder / ANALYSIS_DIR}` first")
    raise DepthprobeError(f"{path} is not a depthprobe run folder (no {LAYERS_CSV} and {SUMMARY_JSON} in it or "
                          "in its analysis/); give a folder written by analyze, prune or train --out")


def model_source(source: str | Path) -> str:
    """Where the model of a run folder is, for commands that load a model (``analyze``, ``prune``).

    A ``train --out`` folder keeps its model in ``model/``; a ``prune --out`` folder is a model
    folder itself; an ``analyze --out`` or ``compare --out`` folder holds no model (one-line
    error saying what to pass). Anything else (hub id, model folder, file) is returned unchanged.
    """
    folder = Path(source).expanduser()
    if not folder.is_dir() or _is_model_folder(folder):
        return str(source)
    if _is_model_folder(folder / MODEL_DIR):
        return str(folder / MODEL_DIR)
    if (folder / COMPARISON_CSV).is_file():
        models = sorted(folder.glob(f"*/seed*/{MODEL_DIR}"))
        example = f", e.g. {models[0].parent}" if models else ""
        raise DepthprobeError(f"{source} is a `depthprobe compare` folder: it holds one model per variant and seed; "
                              f"pass one run folder{example}")
    if (folder / SUMMARY_JSON).is_file():
        measured = json.loads((folder / SUMMARY_JSON).read_text()).get("model")
        raise DepthprobeError(f"{source} holds analysis results, not a model; analyze the model it measured"
                              + (f" ({measured})" if measured else ""))
    return str(source)


def _is_model_folder(folder: Path) -> bool:
    """A transformers model folder: a config.json naming a model type (a training run's own
    config.json, beside its model/ folder, names none)."""
    try:
        return "model_type" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False


def seed_dir(folder: str | Path, variant: str, seed: int) -> Path:
    """Where a comparison keeps the training folder of one variant and seed."""
    return Path(folder) / str(variant) / f"seed{seed}"


@dataclass(frozen=True)
class RunFiles:
    """What one run folder (analyze, prune or train ``--out``) holds, by path."""

    analysis: Path  # the analyze folder: the run folder itself or its analysis/
    side_tables: dict[str, Path]  # table name -> CSV kept beside analysis/ (:data:`SIDE_TABLES`)
    prune_json: Path | None  # a prune folder's prune.json
    label: str | None  # the folder's name when short enough to label a figure with


def run_files(path: str | Path) -> RunFiles:
    """The files of one run folder; a one-line error when it holds no depthprobe results."""
    folder = Path(path)
    if not folder.is_dir():
        raise DepthprobeError(f"run folder not found: {path}")
    if (folder / SUMMARY_JSON).is_file():
        analysis = folder
    elif (folder / ANALYSIS_DIR / SUMMARY_JSON).is_file():
        analysis = folder / ANALYSIS_DIR
    else:
        raise DepthprobeError(f"{path} holds no depthprobe results (no summary.json or analysis/summary.json)")
    side = {name: folder / f"{name}.csv" for name in SIDE_TABLES if (folder / f"{name}.csv").is_file()}
    prune_json = folder / PRUNE_JSON if (folder / PRUNE_JSON).is_file() else None
    return RunFiles(analysis, side, prune_json, folder.name if len(folder.name) < 40 else None)


def is_comparison(path: str | Path) -> bool:
    """A ``compare --out`` folder (one training folder per variant and seed)."""
    return (Path(path) / COMPARISON_CSV).is_file()


def analyzed(run_dir: Path) -> bool:
    """Whether a training folder of a comparison was analyzed (a diverged run was not)."""
    return (run_dir / ANALYSIS_DIR / SUMMARY_JSON).is_file()
