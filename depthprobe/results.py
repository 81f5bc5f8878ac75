"""One tidy per-layer table plus a summary: what every analysis returns and saves.

On disk (``--out DIR``):

- ``layers.csv``: one row per block, ``layer`` (0-based) first, then one column per metric
  (``angular_distance``, ``block_influence``, ``activation_variance``, ``activation_rms``,
  ``max_abs_activation``, ``grad_norm``, ``grad_norm_attn``, ``grad_norm_mlp``,
  ``logit_lens_loss``, ``drop_delta_loss``, ...). Metrics not measured are absent.
- ``angular_distance.csv``: row ``layer`` l, column ``n`` = 1..L-l, the mean angular distance
  between x_l and x_{l+n} (Gromov et al. 2024); empty beyond the last block.
- ``summary.json``: model, architecture, num_layers, num_tokens, base_loss,
  base_perplexity, objective, dtype, device, versions, timings_s, metrics, notes, config.
- any extra tables an analysis adds (``block_drop.csv``, ``proxies.csv``, ...).

Other commands' folders (the one place that knows these names; :func:`load_run` reads them):

- ``prune --out``: the pruned model, ``prune.json``, ``prune_curve.csv``, ``prune_excess.csv``
  and ``analysis/`` (an analyze folder).
- ``train --out``: ``metrics.csv``, ``train_layers.csv`` and ``analysis/``.
- ``compare --out``: ``comparison.csv``, ``comparison_summary.csv`` and one training folder
  per variant and seed, ``<variant>/seed<seed>/``; :func:`load_runs` expands it.
- ``drop_progress.jsonl``: the drop sweep's finished batches while it runs (resume).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from depthprobe.errors import DepthprobeError
from depthprobe.safeio import atomic_to_csv, atomic_write_text

LAYERS_CSV = "layers.csv"
ANGULAR_CSV = "angular_distance.csv"
SUMMARY_JSON = "summary.json"
REPORT_HTML = "report.html"
DROP_PROGRESS = "drop_progress.jsonl"
ORIGINAL_DIR = "original"  # in a prune folder: the analysis of the model the blocks were chosen from
ANALYSIS_DIR = "analysis"  # the analyze folder inside a prune or train folder
PRUNE_JSON = "prune.json"
PRUNE_CURVE_CSV = "prune_curve.csv"
PRUNE_EXCESS_CSV = "prune_excess.csv"
COMPARISON_CSV = "comparison.csv"
COMPARISON_SUMMARY_CSV = "comparison_summary.csv"
#: tables a prune or train folder keeps beside its ``analysis/`` folder
SIDE_TABLES = ("prune_curve", "prune_excess", "metrics", "train_layers", "eval", "eval_retention", "bench",
               "bench_speedup", "repair_curve")


@dataclass
class AnalysisResult:
    """Per-layer table, angular-distance matrix, summary and optional extra tables.

    Example:
        >>> result = depthprobe.analyze(model, tokenizer, metrics="angular,variance")  # doctest: +SKIP
        >>> result.layers[["layer", "angular_distance"]].tail(3)                     # doctest: +SKIP
        >>> result.save("runs/smol")                                                 # doctest: +SKIP
    """

    layers: pd.DataFrame
    summary: dict
    angular_distance: pd.DataFrame | None = None
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def save(self, out_dir: str | Path) -> Path:
        """Write ``layers.csv``, ``angular_distance.csv``, ``summary.json`` and extra tables;
        ``summary.json`` lists them under ``files`` (what :meth:`load` reads)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_to_csv(self.layers, out / LAYERS_CSV, index=False, float_format="%.10g")
        files = [LAYERS_CSV]
        if self.angular_distance is not None:
            atomic_to_csv(self.angular_distance, out / ANGULAR_CSV, float_format="%.10g")
            files.append(ANGULAR_CSV)
        for name, table in self.tables.items():
            atomic_to_csv(table, out / f"{name}.csv", index=False, float_format="%.10g")
            files.append(f"{name}.csv")
        self.summary["files"] = [*files, SUMMARY_JSON]
        write_json(out / SUMMARY_JSON, self.summary)
        return out

    @classmethod
    def load(cls, run_dir: str | Path) -> AnalysisResult:
        """Read a folder written by :meth:`save` or any run folder (analyze, prune or train
        ``--out``: see :func:`analysis_dir`)."""
        run = analysis_dir(run_dir)
        layers = pd.read_csv(run / LAYERS_CSV)
        summary = json.loads((run / SUMMARY_JSON).read_text())
        angular = pd.read_csv(run / ANGULAR_CSV, index_col=0) if (run / ANGULAR_CSV).is_file() else None
        if angular is not None:
            angular.columns = [int(c) for c in angular.columns]
        # a folder lists its run's files: another run's leftovers are never read as part of it
        listed = [run / f for f in summary["files"]] if "files" in summary else sorted(run.glob("*.csv"))
        tables = {p.stem: pd.read_csv(p) for p in listed
                  if p.suffix == ".csv" and p.name not in (LAYERS_CSV, ANGULAR_CSV)}
        return cls(layers=layers, summary=summary, angular_distance=angular, tables=tables)

    def _repr_html_(self) -> str:
        """Jupyter's view: header, findings, main figures and the per-layer table, self-contained."""
        # imported on first display: loading results (the pytest plugin does) needs no matplotlib
        from depthprobe.report.notebook import result_html

        return result_html(self)

    def __repr__(self) -> str:
        s = self.summary
        return (
            f"AnalysisResult(model={s.get('model')!r}, layers={self.num_layers}, "
            f"metrics={[c for c in self.layers.columns if c != 'layer']})"
        )


def angular_matrix_frame(matrix: list[list[float]]) -> pd.DataFrame:
    """Row l, column n=1..L-l: the square ``(L+1, L+1)`` mean-angle matrix to the CSV layout."""
    n_states = len(matrix)
    num_layers = n_states - 1
    rows = {
        layer: {n: matrix[layer][layer + n] for n in range(1, num_layers - layer + 1)} for layer in range(num_layers)
    }
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=range(1, num_layers + 1))
    frame.index.name = "layer"
    return frame


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")


def _jsonable(value):
    """NaN/inf become null so the file is strict JSON any tool can read."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            return _jsonable(value.item())
        except (ValueError, TypeError):
            return str(value)
    return value


def analysis_dir(path: str | Path) -> Path:
    """The folder holding ``layers.csv`` and ``summary.json`` of any depthprobe run folder:
    the folder itself (``analyze --out``) or its ``analysis/`` (``prune --out``, ``train --out``).

    A ``compare --out`` folder holds one run per variant and seed: the error names one.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise DepthprobeError(f"run folder not found: {path}")
    for candidate in (folder, folder / "analysis"):
        if (candidate / LAYERS_CSV).is_file() and (candidate / SUMMARY_JSON).is_file():
            return candidate
    seeds = sorted(folder.glob("*/seed*/analysis"))
    if (folder / "comparison.csv").is_file() and seeds:
        raise DepthprobeError(f"{path} is a `depthprobe compare` folder with one run per variant and seed; "
                              f"pass one of them, e.g. {seeds[0].parent}")
    if (folder / "model" / "config.json").is_file():
        raise DepthprobeError(f"{path} is a training run without an analysis (trained with --no-report?); "
                              f"run `depthprobe analyze {path} --out {folder / 'analysis'}` first")
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
    if _is_model_folder(folder / "model"):
        return str(folder / "model")
    if (folder / "comparison.csv").is_file():
        models = sorted(folder.glob("*/seed*/model"))
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


def load_run(path: str | Path) -> AnalysisResult:
    """An :class:`AnalysisResult` from one depthprobe output folder: analyze, prune or train
    (see the module docs); a prune folder's ``prune.json`` goes to ``summary["prune"]``."""
    folder = Path(path)
    if not folder.is_dir():
        raise DepthprobeError(f"run folder not found: {path}")
    if (folder / SUMMARY_JSON).is_file():
        result = AnalysisResult.load(folder)
    elif (folder / ANALYSIS_DIR / SUMMARY_JSON).is_file():
        result = AnalysisResult.load(folder / ANALYSIS_DIR)
    else:
        raise DepthprobeError(f"{path} holds no depthprobe results (no summary.json or analysis/summary.json)")
    for name in SIDE_TABLES:
        csv = folder / f"{name}.csv"
        if csv.is_file() and name not in result.tables:
            result.tables[name] = pd.read_csv(csv)
    if (folder / PRUNE_JSON).is_file():
        result.summary["prune"] = json.loads((folder / PRUNE_JSON).read_text())
    result.summary.setdefault("label", folder.name if len(folder.name) < 40 else result.summary.get("model"))
    return result


def load_runs(path: str | Path) -> list[AnalysisResult]:
    """The runs in one output folder: one, or one per variant for a ``compare`` folder (its
    first analyzed seed, labelled; the first run carries the table ``comparison``)."""
    folder = Path(path)
    if not (folder / COMPARISON_CSV).is_file():
        return [load_run(folder)]
    runs_table = pd.read_csv(folder / COMPARISON_CSV)
    runs: dict[str, AnalysisResult] = {}
    for row in runs_table.itertuples(index=False):
        run_dir = seed_dir(folder, row.variant, row.seed)
        if row.variant not in runs and (run_dir / ANALYSIS_DIR / SUMMARY_JSON).is_file():
            runs[row.variant] = load_run(run_dir)
            runs[row.variant].summary["label"] = f"{row.variant} (seed {row.seed})"
    if not runs:
        raise DepthprobeError(f"{path}: no run of this comparison was analyzed (all diverged?); nothing to report")
    first = next(iter(runs.values()))
    summary_csv = folder / COMPARISON_SUMMARY_CSV
    first.tables["comparison"] = pd.read_csv(summary_csv if summary_csv.is_file() else folder / COMPARISON_CSV)
    return list(runs.values())


def parse_list(value: str | Sequence | None, flag: str, cast: Callable = str, example: str = "a,b") -> list:
    """``"2, 4,8"`` -> ``[2, 4, 8]`` (with ``cast=int``): the one comma-list parser of options.

    Empty items are skipped; a list is cast item by item; a bad item is a one-line error
    naming ``flag``.
    """
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        return [cast(v.strip() if isinstance(v, str) else v) for v in items if not (isinstance(v, str) and not v.strip())]
    except (TypeError, ValueError) as exc:
        kind = {int: " of integers", float: " of numbers"}.get(cast, "")
        raise DepthprobeError(f"{flag} takes a comma-separated list{kind} like {example} (got {value!r})") from exc
