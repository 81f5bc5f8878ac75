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

The run-folder layout (every file and folder name, prune / train / compare folders) is
:mod:`depthprobe.runs`; this module is the data and its (de)serialization.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from depthprobe import runs
from depthprobe.errors import DepthprobeError
from depthprobe.safeio import atomic_to_csv, atomic_write_text
from depthprobe.views import html_view

#: names that moved to :mod:`depthprobe.runs`: importing them from here warns, for one release
_MOVED_TO_RUNS = ("LAYERS_CSV", "ANGULAR_CSV", "SUMMARY_JSON", "REPORT_HTML", "DROP_PROGRESS", "ORIGINAL_DIR",
                  "ANALYSIS_DIR", "PRUNE_JSON", "PRUNE_CURVE_CSV", "PRUNE_EXCESS_CSV", "COMPARISON_CSV",
                  "COMPARISON_SUMMARY_CSV", "SIDE_TABLES", "analysis_dir", "model_source", "seed_dir")


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
        """Write ``layers.csv``, ``angular_distance.csv``, ``summary.json`` and extra tables."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_to_csv(self.layers, out / runs.LAYERS_CSV, index=False, float_format="%.10g")
        if self.angular_distance is not None:
            atomic_to_csv(self.angular_distance, out / runs.ANGULAR_CSV, float_format="%.10g")
        for name, table in self.tables.items():
            atomic_to_csv(table, out / f"{name}.csv", index=False, float_format="%.10g")
        write_json(out / runs.SUMMARY_JSON, self.summary)
        return out

    @classmethod
    def load(cls, run_dir: str | Path) -> AnalysisResult:
        """Read a folder written by :meth:`save` or any run folder (analyze, prune or train
        ``--out``: see :func:`analysis_dir`)."""
        run = runs.analysis_dir(run_dir)
        layers = pd.read_csv(run / runs.LAYERS_CSV)
        summary = json.loads((run / runs.SUMMARY_JSON).read_text())
        angular = pd.read_csv(run / runs.ANGULAR_CSV, index_col=0) if (run / runs.ANGULAR_CSV).is_file() else None
        if angular is not None:
            angular.columns = [int(c) for c in angular.columns]
        tables = {
            p.stem: pd.read_csv(p) for p in sorted(run.glob("*.csv")) if p.name not in (runs.LAYERS_CSV, runs.ANGULAR_CSV)
        }
        return cls(layers=layers, summary=summary, angular_distance=angular, tables=tables)

    def _repr_html_(self) -> str | None:
        """Jupyter's view: header, findings, main figures and the per-layer table, self-contained
        (:func:`depthprobe.report.notebook.result_html`, registered in :mod:`depthprobe.views`)."""
        return html_view(self)

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


def load_run(path: str | Path) -> AnalysisResult:
    """An :class:`AnalysisResult` from one depthprobe output folder: analyze, prune or train
    (:func:`depthprobe.runs.run_files`); a prune folder's ``prune.json`` goes to ``summary["prune"]``."""
    files = runs.run_files(path)
    result = AnalysisResult.load(files.analysis)
    for name, csv in files.side_tables.items():
        if name not in result.tables:
            result.tables[name] = pd.read_csv(csv)
    if files.prune_json is not None:
        result.summary["prune"] = json.loads(files.prune_json.read_text())
    result.summary.setdefault("label", files.label if files.label is not None else result.summary.get("model"))
    return result


def load_runs(path: str | Path) -> list[AnalysisResult]:
    """The runs in one output folder: one, or one per variant for a ``compare`` folder (its
    first analyzed seed, labelled; the first run carries the table ``comparison``)."""
    folder = Path(path)
    if not runs.is_comparison(folder):
        return [load_run(folder)]
    loaded: dict[str, AnalysisResult] = {}
    for row in pd.read_csv(folder / runs.COMPARISON_CSV).itertuples(index=False):
        run_dir = runs.seed_dir(folder, row.variant, row.seed)
        if row.variant not in loaded and runs.analyzed(run_dir):
            loaded[row.variant] = load_run(run_dir)
            loaded[row.variant].summary["label"] = f"{row.variant} (seed {row.seed})"
    if not loaded:
        raise DepthprobeError(f"{path}: no run of this comparison was analyzed (all diverged?); nothing to report")
    first = next(iter(loaded.values()))
    summary_csv = folder / runs.COMPARISON_SUMMARY_CSV
    first.tables["comparison"] = pd.read_csv(summary_csv if summary_csv.is_file() else folder / runs.COMPARISON_CSV)
    return list(loaded.values())


def __getattr__(name: str):
    if name in _MOVED_TO_RUNS:
        warnings.warn(f"depthprobe.results.{name} moved to depthprobe.runs.{name}; this alias goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return getattr(runs, name)
    raise AttributeError(f"module 'depthprobe.results' has no attribute {name!r}")
