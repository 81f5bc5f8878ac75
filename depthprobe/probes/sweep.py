"""The seam every sweep plugs into: what a sweep gets, what it returns, and its typed options.

A sweep is a function ``(SweepContext) -> SweepOutput`` that measures more than the main
pass can (drop damage, attribution). ``analyze`` runs the requested sweeps by function
reference, in order, and merges their columns, tables and summary entries into one result.

Options are frozen dataclasses, one per sweep, built from the flat option names the CLI and
older callers use (``block_sizes``, ``attribution_steps``, ``bootstrap_samples``...): a
misspelled name is an error, never silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from depthprobe.data import Windows
from depthprobe.errors import DepthprobeError
from depthprobe.model.stack import LayerStack
from depthprobe.probes.objective import Objective

DEFAULT_BLOCK_SIZES = (2, 4, 8)
DEFAULT_ATTRIBUTION_STEPS = 8
DEFAULT_BOOTSTRAP_SAMPLES = 1000
EXECUTION_ORDERS = ("auto", "batch", "layer")


@dataclass(frozen=True)
class DropOptions:
    """``--metrics drop``: which drops to measure and where finished batches are kept."""

    block_sizes: tuple[int, ...] = DEFAULT_BLOCK_SIZES  # contiguous runs l..l+n-1 (sizes >= L are skipped)
    sublayers: bool = True  # also drop each block's attention and MLP alone
    progress_file: str | None = None  # finished batches are appended here; a resumed sweep skips them

    def __post_init__(self):
        object.__setattr__(self, "block_sizes", tuple(int(n) for n in self.block_sizes))


@dataclass(frozen=True)
class AttributionOptions:
    """``--metrics attribution``: integration accuracy against cost."""

    steps: int = DEFAULT_ATTRIBUTION_STEPS  # path points - 1: (steps + 1) forward+backward passes
    batch_size: int | None = None  # windows per pass (default: the analysis batch size)

    def __post_init__(self):
        if self.steps < 1:
            raise DepthprobeError(f"--attribution-steps must be at least 1 (got {self.steps})")
        if self.batch_size is not None and self.batch_size < 1:
            raise DepthprobeError(f"attribution batch size must be at least 1 (got {self.batch_size})")


@dataclass(frozen=True)
class BootstrapOptions:
    """Bootstrap over windows for drop intervals and proxy agreement (``depthprobe.stats``)."""

    samples: int = DEFAULT_BOOTSTRAP_SAMPLES
    seed: int = 0
    level: float = 0.95

    def __post_init__(self):
        if self.samples < 1:
            raise DepthprobeError(f"bootstrap needs at least one resample (got {self.samples})")
        if not 0 < self.level < 1:
            raise DepthprobeError(f"confidence level must be between 0 and 1 (got {self.level})")


@dataclass(frozen=True)
class ExecutionOptions:
    """How the forward-only passes run: ``batch`` (the model's own forward, batch after
    batch), ``layer`` (every window passes block l before block l+1: each block's weights
    read once per sweep) or ``auto`` (layer-major when accelerate offloads weights)."""

    order: str = "auto"
    state_budget: int | None = None  # bytes of cached streams kept in RAM (default: a quarter of what is free)
    spill_dir: str | None = None  # where streams over the budget are memory-mapped (default: the temp folder)

    def __post_init__(self):
        if self.order not in EXECUTION_ORDERS:
            raise DepthprobeError(f"unknown execution order {self.order!r}; choose {', '.join(EXECUTION_ORDERS)}")
        if self.state_budget is not None and self.state_budget < 0:
            raise DepthprobeError(f"state budget must be at least 0 bytes (got {self.state_budget})")


#: flat option name (CLI, ``analyze(options=...)``) -> (group, field)
OPTION_NAMES: dict[str, tuple[str, str]] = {
    "block_sizes": ("drop", "block_sizes"),
    "sublayers": ("drop", "sublayers"),
    "progress_file": ("drop", "progress_file"),
    "attribution_steps": ("attribution", "steps"),
    "attribution_batch_size": ("attribution", "batch_size"),
    "bootstrap_samples": ("bootstrap", "samples"),
    "bootstrap_seed": ("bootstrap", "seed"),
    "bootstrap_level": ("bootstrap", "level"),
    "execution": ("execution", "order"),
    "state_budget": ("execution", "state_budget"),
    "spill_dir": ("execution", "spill_dir"),
}


@dataclass(frozen=True)
class SweepOptions:
    """The options of every sweep, each group typed."""

    drop: DropOptions = field(default_factory=DropOptions)
    attribution: AttributionOptions = field(default_factory=AttributionOptions)
    bootstrap: BootstrapOptions = field(default_factory=BootstrapOptions)
    execution: ExecutionOptions = field(default_factory=ExecutionOptions)

    @classmethod
    def parse(cls, options: SweepOptions | Mapping | None) -> SweepOptions:
        """From a flat dict of :data:`OPTION_NAMES` (unknown names raise) or as given."""
        if isinstance(options, SweepOptions):
            return options
        groups: dict[str, dict] = {"drop": {}, "attribution": {}, "bootstrap": {}, "execution": {}}
        for name, value in (options or {}).items():
            if name not in OPTION_NAMES:
                raise DepthprobeError(f"unknown analysis option {name!r}; known: {', '.join(OPTION_NAMES)}")
            if value is not None:
                group, attr = OPTION_NAMES[name]
                groups[group][attr] = value
        return cls(DropOptions(**groups["drop"]), AttributionOptions(**groups["attribution"]),
                   BootstrapOptions(**groups["bootstrap"]), ExecutionOptions(**groups["execution"]))

    def flat(self) -> dict:
        """The flat form (what :meth:`parse` reads back), as saved in ``summary.json``."""
        return {name: _jsonable(getattr(getattr(self, group), attr)) for name, (group, attr) in OPTION_NAMES.items()}


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


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


@dataclass
class SweepOutput:
    """What a sweep returns: per-layer columns, extra tables, summary entries, its run time."""

    columns: dict[str, Sequence[float]] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    seconds: float = 0.0
    not_applicable: dict[str, str] = field(default_factory=dict)  # column -> why it is left empty (NaN)


Sweep = Callable[[SweepContext], SweepOutput]
