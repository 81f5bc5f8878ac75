"""Regression checks on a model's per-layer diagnostics, for pytest and CI.

- :mod:`depthprobe.testing.assertions`: ``assert_layers_contribute``, ``assert_grad_norm_ratio``,
  ``assert_no_nan``, ``assert_matches_baseline`` (pure functions over an ``AnalysisResult``).
- :mod:`depthprobe.testing.compare`: ``compare_runs``, the comparison behind
  ``assert_matches_baseline`` and ``depthprobe check``.
- :mod:`depthprobe.testing.plugin`: the pytest plugin (fixtures ``depthprobe_analyze`` and
  ``depthprobe_baseline``, option ``--depthprobe-update-baseline``), loaded automatically.
"""

from __future__ import annotations

from depthprobe.testing.assertions import (
    assert_grad_norm_ratio,
    assert_layers_contribute,
    assert_matches_baseline,
    assert_no_nan,
    save_baseline,
)
from depthprobe.testing.compare import compare_runs, format_comparison

__all__ = [
    "assert_grad_norm_ratio",
    "assert_layers_contribute",
    "assert_matches_baseline",
    "assert_no_nan",
    "compare_runs",
    "format_comparison",
    "save_baseline",
]
