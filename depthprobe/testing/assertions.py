"""Assertions for regression tests on a model's per-layer diagnostics.

Each takes an :class:`~depthprobe.results.AnalysisResult` and raises :class:`AssertionError`
with a message that names the layer(s), the metric, the value and the threshold. They are
plain functions: usable in any test runner, or outside tests. A result that lacks the metric
an assertion needs is a usage mistake (:class:`~depthprobe.errors.DepthprobeError`), not a
failed check.

Example:
    >>> result = depthprobe_analyze("smollm2", metrics="angular,grad")     # doctest: +SKIP
    >>> assert_layers_contribute(result, min_angular_distance=0.02)        # doctest: +SKIP
    >>> assert_grad_norm_ratio(result, max_ratio=10)                       # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from depthprobe.config import split_items
from depthprobe.errors import DepthprobeError
from depthprobe.results import AnalysisResult
from depthprobe.runs import SUMMARY_JSON
from depthprobe.testing.compare import DEFAULT_ATOL, DEFAULT_RTOL, compare_runs, format_comparison, summarize

log = logging.getLogger(__name__)

#: summary keys left out of a saved baseline: they change on every run and would make
#: every baseline update a noisy diff
VOLATILE_SUMMARY_KEYS = ("timings_s",)


def assert_no_nan(result: AnalysisResult, metrics: str | Sequence[str] | None = None) -> None:
    """Every per-layer value (of ``metrics``, default all measured) and the base loss are finite.

    Columns that are NaN in *every* layer mean "not applicable to this model" (e.g.
    ``grad_norm_attn`` where a family has no separate attention module) and are skipped
    unless named in ``metrics``; an empty cell that the run does not list as non-finite
    (``summary["nonfinite"]``) does not apply to its block (a mid state it does not have).
    """
    __tracebackhide__ = True  # pytest shows the user's line, not this one
    columns = _columns(result, metrics)
    if metrics is None:
        columns = [c for c in columns if not result.layers[c].isna().all()]
    # the run lists the computed cells that are not finite; other empty cells do not apply to
    # their block (a mid state or sublayer the block does not have: see the run's notes)
    computed_bad = result.summary.get("nonfinite")
    bad = []
    for column in columns:
        values = result.layers[column].to_numpy(float)
        listed = None if computed_bad is None else set(computed_bad.get(column, []))
        for layer, v in zip(result.layers["layer"], values, strict=True):
            if math.isnan(v) and listed is not None and int(layer) not in listed:
                continue
            if not math.isfinite(v):
                bad.append(f"layer {int(layer)} {column} = {v}")
    loss = result.summary.get("base_loss")
    if result.summary.get("objective") == "lm_loss" and (loss is None or not math.isfinite(loss)):
        bad.append(f"base_loss = {loss} (saved as null when not finite)")
    if bad:
        raise AssertionError(f"{len(bad)} non-finite value(s) in {_name(result)}:\n  " + "\n  ".join(bad))


def assert_layers_contribute(
    result: AnalysisResult,
    min_angular_distance: float = 0.02,
    layers: Sequence[int] | None = None,
    metric: str = "angular_distance",
) -> None:
    """Every block (or each of ``layers``) changes the residual stream by at least a threshold.

    ``angular_distance`` of block l is the mean over tokens of arccos(cos(x_l, x_{l+1}))/pi
    (0: the block passes its input through unchanged, a dead layer). Any other per-layer
    column can be checked with ``metric=`` (e.g. ``block_influence``).
    """
    __tracebackhide__ = True
    values = _column(result, metric)
    rows = result.layers if layers is None else _rows(result, layers)
    v = values.loc[rows.index].to_numpy(float)
    failing = ~(v >= min_angular_distance)  # NaN fails too
    if failing.any():
        lines = [f"layer {int(lay)}: {metric} = {x:.4g}" for lay, x in zip(rows["layer"][failing], v[failing], strict=True)]
        raise AssertionError(
            f"{int(failing.sum())} layer(s) of {_name(result)} below {metric} >= {min_angular_distance:g}:\n  "
            + "\n  ".join(lines)
        )


def assert_grad_norm_ratio(result: AnalysisResult, max_ratio: float = 10.0, metric: str = "grad_norm") -> None:
    """Gradient norms stay within ``max_ratio`` across depth: max over layers / min <= max_ratio.

    ``grad_norm`` of block l is the L2 norm of the gradients of all its parameters for the
    mean-token LM loss (``analyze(metrics="grad")``). A zero or non-finite norm fails.
    """
    __tracebackhide__ = True
    values = _column(result, metric).to_numpy(float)
    if np.isnan(values).all():
        raise DepthprobeError(f"{metric} is empty in {_name(result)}; the model has no LM head to take gradients of")
    bad = [int(lay) for lay, v in zip(result.layers["layer"], values, strict=True) if not (math.isfinite(v) and v > 0)]
    if bad:
        shown = ", ".join(f"layer {lay} = {values[i]:.4g}" for i, lay in enumerate(result.layers["layer"]) if lay in bad)
        raise AssertionError(f"{metric} of {_name(result)} is zero or not finite: {shown}")
    hi, lo = int(np.argmax(values)), int(np.argmin(values))
    ratio = values[hi] / values[lo]
    if not ratio <= max_ratio:
        layer = result.layers["layer"]
        raise AssertionError(
            f"{metric} ratio {ratio:.4g} exceeds {max_ratio:g} in {_name(result)}: "
            f"largest at layer {int(layer.iloc[hi])} = {values[hi]:.4g}, "
            f"smallest at layer {int(layer.iloc[lo])} = {values[lo]:.4g}"
        )


def assert_matches_baseline(
    result: AnalysisResult,
    baseline_dir: str | Path,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    metrics: str | Sequence[str] | None = None,
    update: bool = False,
) -> pd.DataFrame | None:
    """Every metric of ``result`` is within tolerance of the baseline saved in ``baseline_dir``.

    With ``update=True`` the baseline is (re)written from ``result`` instead (in the pytest
    plugin: ``--depthprobe-update-baseline``, through the ``depthprobe_baseline`` fixture).
    The baseline folder has the layout of ``depthprobe analyze --out`` minus volatile timings,
    so ``depthprobe check RUN --baseline DIR`` reads the same folder.

    Returns:
        the comparison table (see :func:`~depthprobe.testing.compare.compare_runs`), or None
        after an update.
    """
    __tracebackhide__ = True
    folder = Path(baseline_dir)
    if update:
        save_baseline(result, folder)
        return None
    if not (folder / SUMMARY_JSON).is_file():
        raise AssertionError(
            f"no baseline in {folder}; run pytest with --depthprobe-update-baseline to create it "
            "(or assert_matches_baseline(..., update=True))"
        )
    table = compare_runs(result, folder, rtol=rtol, atol=atol, metrics=metrics)
    if not table["ok"].all():
        raise AssertionError(
            f"{_name(result)} does not match baseline {folder}: {summarize(table, rtol, atol)}\n"
            f"{format_comparison(table)}\n"
            "(if the change is intended, rerun with --depthprobe-update-baseline)"
        )
    return table


def save_baseline(result: AnalysisResult, folder: str | Path) -> Path:
    """Write ``result`` as a baseline: the analyze layout, summary keys sorted, timings dropped."""
    summary = {k: result.summary[k] for k in sorted(result.summary) if k not in VOLATILE_SUMMARY_KEYS}
    stable = AnalysisResult(
        layers=result.layers.sort_values("layer").reset_index(drop=True),
        summary=summary,
        angular_distance=result.angular_distance,
        tables=result.tables,
    )
    out = stable.save(folder)
    log.info("baseline written to %s", out)
    return out


def _name(result: AnalysisResult) -> str:
    return str(result.summary.get("model") or "the model")


def _column(result: AnalysisResult, metric: str) -> pd.Series:
    if metric not in result.layers.columns:
        have = ", ".join(c for c in result.layers.columns if c != "layer")
        raise DepthprobeError(f"the result has no {metric} column (it has {have}); analyze with the metric that gives it")
    return result.layers[metric]


def _columns(result: AnalysisResult, metrics: str | Sequence[str] | None) -> list[str]:
    if metrics is None:
        return [c for c in result.layers.columns if c != "layer"]
    metrics = [str(m) for m in split_items(metrics)]
    for m in metrics:
        _column(result, m)
    return list(metrics)


def _rows(result: AnalysisResult, layers: Sequence[int]) -> pd.DataFrame:
    known = set(result.layers["layer"].astype(int))
    unknown = [lay for lay in layers if lay not in known]
    if unknown:
        raise DepthprobeError(f"layer(s) {unknown} not in the result (layers 0..{len(known) - 1})")
    return result.layers[result.layers["layer"].isin(list(layers))]
