"""Compare a run against a baseline, metric by metric and layer by layer.

One function, :func:`compare_runs`, serves both ``depthprobe check`` and
:func:`~depthprobe.testing.assertions.assert_matches_baseline`. A value has *moved* when

    |value - baseline| > atol + rtol * |baseline|

(the baseline is the reference, as in :func:`numpy.isclose`). NaN in both is equal; NaN in
only one has moved; +inf equals +inf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from depthprobe.config import split_items
from depthprobe.errors import DepthprobeError
from depthprobe.results import AnalysisResult

#: summary.json scalars compared with the per-layer metrics (rows with an empty ``layer``)
SUMMARY_SCALARS = ("base_loss", "base_perplexity")
DEFAULT_RTOL = 0.05
DEFAULT_ATOL = 1e-8
COLUMNS = ["layer", "metric", "baseline", "value", "abs_diff", "rel_diff", "ok"]

RunLike = AnalysisResult | str | Path


def compare_runs(
    run: RunLike,
    baseline: RunLike,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    metrics: str | Sequence[str] | None = None,
    allow_different_text: bool = False,
) -> pd.DataFrame:
    """One row per (layer, metric) and per summary scalar: baseline, value, differences, ok.

    Runs measured on a different model, calibration text, window setup or dtype are refused
    first (a moved value would blame the model for the setup), unless ``allow_different_text``;
    then the differences are in ``table.attrs["setup_differences"]``.

    Args:
        run: the new result (an :class:`AnalysisResult` or an ``analyze --out`` folder).
        baseline: the reference result, same forms.
        rtol, atol: tolerances; a value is ok when ``|value - baseline| <= atol + rtol*|baseline|``.
        metrics: ``layers.csv`` column names and/or summary scalars (``base_loss``,
            ``base_perplexity``) to compare, as a list or comma string. Default: every
            metric column of the baseline plus the summary scalars it has.

    Returns:
        DataFrame with columns ``layer`` (nullable int; empty for summary scalars),
        ``metric``, ``baseline``, ``value``, ``abs_diff``, ``rel_diff`` (``abs_diff/|baseline|``)
        and ``ok``; per-layer rows first, ordered by metric then layer.

    Raises:
        DepthprobeError: a folder is missing or unreadable, the layer counts or token counts
            differ, or a requested metric is missing from either side.

    Example:
        >>> table = compare_runs("runs/today", "runs/baseline", rtol=0.05)   # doctest: +SKIP
        >>> table[~table.ok]                                                 # doctest: +SKIP
    """
    if not (rtol >= 0 and atol >= 0):  # also rejects NaN
        raise DepthprobeError(f"tolerances must be >= 0 (got rtol={rtol}, atol={atol})")
    run_r, base_r = _as_result(run, "run"), _as_result(baseline, "baseline")
    differences = _comparable(run_r, base_r, allow_different_text)
    layer_metrics, scalars = _select(metrics, run_r, base_r)

    records = []
    base_layers = base_r.layers.set_index("layer")
    run_layers = run_r.layers.set_index("layer")
    for metric in layer_metrics:
        for layer in base_layers.index:
            records.append((int(layer), metric, base_layers.at[layer, metric], run_layers.at[layer, metric]))
    for name in scalars:
        records.append((pd.NA, name, _scalar(base_r.summary.get(name)), _scalar(run_r.summary.get(name))))
    frame = pd.DataFrame.from_records(records, columns=["layer", "metric", "baseline", "value"])
    frame["layer"] = frame["layer"].astype("Int64")
    base = frame["baseline"].to_numpy(float)
    value = frame["value"].to_numpy(float)
    abs_diff, rel_diff = _differences(base, value)
    frame["baseline"], frame["value"] = base, value
    frame["abs_diff"], frame["rel_diff"] = abs_diff, rel_diff
    frame["ok"] = np.isclose(value, base, rtol=rtol, atol=atol, equal_nan=True)
    frame = frame[COLUMNS]
    frame.attrs["setup_differences"] = differences
    return frame


def _comparable(run_r: AnalysisResult, base_r: AnalysisResult, allow_different_text: bool) -> list[str]:
    """Refuse runs that cannot be compared; the setup differences that were allowed."""
    if run_r.num_layers != base_r.num_layers:
        raise DepthprobeError(
            f"the run has {run_r.num_layers} layers but the baseline has {base_r.num_layers}; "
            "compare runs of the same model"
        )
    differences = setup_differences(run_r, base_r)
    if differences and not allow_different_text:
        raise DepthprobeError("the run and the baseline were measured differently (" + "; ".join(differences)
                              + "); analyze with the baseline's settings, or pass --allow-different-text")
    run_tokens, base_tokens = run_r.summary.get("num_tokens"), base_r.summary.get("num_tokens")
    if run_tokens is not None and base_tokens is not None and run_tokens != base_tokens:
        raise DepthprobeError(
            f"the run measured {run_tokens} tokens but the baseline {base_tokens}; "
            "analyze with the baseline's --num-sequences and --seq-len"
        )
    return differences


#: summary fields that must agree before values can be blamed on the model: (key, what it is)
SETUP_FIELDS = (("model", "model"), ("text_source", "calibration text"), ("num_sequences", "windows"),
                ("seq_len", "tokens per window"), ("dtype", "dtype"))


def setup_differences(run: AnalysisResult, baseline: AnalysisResult) -> list[str]:
    """What differs in how the two were measured, e.g. ``"calibration text 'file:b.txt' vs 'file:a.txt'"``
    (run first). Fields missing from either summary (older baselines) are not compared."""
    out = []
    for key, what in SETUP_FIELDS:
        mine, theirs = run.summary.get(key), baseline.summary.get(key)
        if mine is not None and theirs is not None and mine != theirs:
            out.append(f"{what} {mine!r} in the run vs {theirs!r} in the baseline")
    return out


def format_comparison(table: pd.DataFrame, only_moved: bool = True, max_rows: int = 50) -> str:
    """The comparison as terminal text: what moved (or every row), largest relative change first."""
    shown = table[~table["ok"]] if only_moved else table
    if shown.empty:
        return "(nothing moved)"
    if only_moved:
        shown = shown.sort_values(["rel_diff", "abs_diff"], ascending=False, kind="stable")
    more = len(shown) - max_rows
    shown = shown.head(max_rows).copy()
    shown["layer"] = shown["layer"].astype(object).where(shown["layer"].notna(), "-")
    with pd.option_context("display.max_rows", max_rows + 1, "display.width", 200):
        text = shown.drop(columns="ok").to_string(index=False, float_format=lambda v: f"{v:.6g}")
    return text + (f"\n... and {more} more" if more > 0 else "")


def summarize(table: pd.DataFrame, rtol: float, atol: float) -> str:
    """One line: how many values were compared and how many moved beyond the tolerance."""
    moved = int((~table["ok"]).sum())
    n_metrics = table.loc[table["layer"].notna(), "metric"].nunique()
    n_layers = table["layer"].nunique()
    n_scalars = int(table["layer"].isna().sum())
    what = f"{len(table)} values ({n_layers} layers x {n_metrics} metrics + {n_scalars} summary values)"
    if moved:
        return f"{moved} of {what} moved beyond rtol={rtol:g}, atol={atol:g}"
    return f"all {what} within rtol={rtol:g}, atol={atol:g}"


def _as_result(run: RunLike, role: str) -> AnalysisResult:
    if isinstance(run, AnalysisResult):
        return run
    path = Path(run)
    if not path.is_dir():
        raise DepthprobeError(f"{role} folder {path} does not exist; pass a folder written by `depthprobe analyze --out`")
    try:
        return AnalysisResult.load(path)
    except DepthprobeError:
        raise
    except (ValueError, OSError) as exc:  # pandas parser errors and JSON decode errors are ValueErrors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DepthprobeError(f"cannot read the {role} folder {path}: {first}") from exc


def _select(
    metrics: str | Sequence[str] | None, run: AnalysisResult, base: AnalysisResult
) -> tuple[list[str], list[str]]:
    """(layer columns, summary scalars) to compare; a requested one missing on a side is an error."""
    base_cols = [c for c in base.layers.columns if c != "layer"]
    run_cols = [c for c in run.layers.columns if c != "layer"]
    if metrics is None:
        wanted = base_cols + [s for s in SUMMARY_SCALARS if _present(base.summary, s) or _present(run.summary, s)]
    else:
        wanted = list(dict.fromkeys(m for m in map(str, split_items(metrics)) if m))
        if not wanted:
            raise DepthprobeError("--metrics is empty; e.g. --metrics angular_distance,grad_norm")
    layer_metrics = [m for m in wanted if m not in SUMMARY_SCALARS]
    scalars = [m for m in wanted if m in SUMMARY_SCALARS]
    for side, cols in (("baseline", base_cols), ("run", run_cols)):
        missing = [m for m in layer_metrics if m not in cols]
        if missing:
            hint = "analyze with the baseline's --metrics, or pass --metrics to compare fewer" if metrics is None else ""
            raise DepthprobeError(
                f"metric(s) {', '.join(missing)} missing from the {side} (it has {', '.join(cols) or 'none'})"
                + (f"; {hint}" if hint else "")
            )
    if metrics is not None:
        for side, summary in (("baseline", base.summary), ("run", run.summary)):
            missing = [s for s in scalars if s not in summary]
            if missing:
                raise DepthprobeError(f"summary value(s) {', '.join(missing)} missing from the {side}")
    return layer_metrics, scalars


def _present(summary: dict, key: str) -> bool:
    return summary.get(key) is not None


def _scalar(value) -> float:
    """A summary value as float; JSON null (how NaN is saved) becomes NaN."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _differences(base: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """|value - baseline| and that over |baseline|; 0 where both are equal (NaN/inf included),
    inf where exactly one side is NaN or the baseline is 0 and the value is not."""
    with np.errstate(invalid="ignore", divide="ignore"):
        abs_diff = np.abs(value - base)
        same = (base == value) | (np.isnan(base) & np.isnan(value))
        abs_diff = np.where(same, 0.0, np.where(np.isnan(abs_diff), np.inf, abs_diff))
        rel_diff = np.where(abs_diff == 0, 0.0, abs_diff / np.abs(base))
        rel_diff = np.where(np.isnan(rel_diff), np.inf, rel_diff)
    return abs_diff, rel_diff
