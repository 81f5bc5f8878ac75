"""Moved: measuring drop damage is a probe, :mod:`depthprobe.probes.drop`. These names stay
importable from here for existing code."""

from depthprobe.probes.drop import (
    DEFAULT_BLOCK_SIZES,
    BatchScorer,
    DropSweepResult,
    capture_states,
    drop_sweep,
    run_drop_sweep,
)

__all__ = ["DEFAULT_BLOCK_SIZES", "BatchScorer", "DropSweepResult", "capture_states", "drop_sweep", "run_drop_sweep"]
