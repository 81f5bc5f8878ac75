"""The seam every sweep plugs into: what a sweep gets, what it returns, and its typed options.

A sweep is a function ``(SweepContext) -> SweepOutput`` that measures more than the main
pass can (drop damage, attribution). ``analyze`` runs the requested sweeps by function
reference, in order, and merges their columns, tables and summary entries into one result.

The typed options of every sweep live in :mod:`depthprobe.config` (the one home of every
default); they are re-exported here, where the sweeps have always imported them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from depthprobe.config import (  # noqa: F401  (re-exported: the sweeps' options)
    DEFAULT_ATTRIBUTION_STEPS,
    DEFAULT_BLOCK_SIZES,
    DEFAULT_BOOTSTRAP_SAMPLES,
    EXECUTION_ORDERS,
    OPTION_NAMES,
    AttributionOptions,
    BootstrapOptions,
    DropOptions,
    ExecutionOptions,
    SweepOptions,
)
from depthprobe.data import Windows
from depthprobe.model.stack import LayerStack
from depthprobe.probes.objective import Objective


@dataclass
class SweepContext:
    """What a sweep gets: the stack, the windows, the objective and the main pass's reference values."""

    stack: LayerStack
    windows: Windows
    objective: Objective
    batch_size: int
    options: SweepOptions
    base_loss: float | None = None
    base_nll_per_window: np.ndarray | None = None  # (N,) mean-token loss of each window
    progress: bool = True
    tokenizer: object | None = None  # for sweeps that read text or print tokens (tuned-lens, lens tokens)


@dataclass
class SweepOutput:
    """What a sweep returns: per-layer columns, extra tables, summary entries, its run time."""

    columns: dict[str, Sequence[float]] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    seconds: float = 0.0
    not_applicable: dict[str, str] = field(default_factory=dict)  # column -> why it is left empty (NaN)


Sweep = Callable[[SweepContext], SweepOutput]
