"""The two execution orders of the engine, one constructor: which schedule runs a pass."""

from __future__ import annotations

import os

from depthprobe.probes.batch import Batch
from depthprobe.probes.batch_major import BatchMajor
from depthprobe.probes.layer_major import LayerMajor
from depthprobe.probes.objective import Objective


def make_schedule(order: str, objective: Objective, batches: list[Batch], progress: bool, budget: int | None = None,
                  spill_dir: str | os.PathLike | None = None):
    """The schedule for ``order`` (``"batch"`` or ``"layer"``) over ``batches``."""
    if order == "layer":
        return LayerMajor(objective, batches, progress, budget=budget, spill_dir=spill_dir)
    return BatchMajor(objective, batches, progress)
