"""One config: every default of an analysis, and the typed options of every sweep.

Like nanoGPT's config, this is the one home of each default (windows, tokens, batch size,
metrics, drop sizes, attribution steps, bootstrap, execution order): the CLI options, the
Python API (:func:`depthprobe.analyze`, :func:`depthprobe.prune.prune`), the memory plan and
the pytest plugin read them from here. Pure data: it imports nothing but the error type, so
every layer of the package may use it.

Options are frozen dataclasses, one per sweep, built from the flat option names the CLI and
older callers use (``block_sizes``, ``attribution_steps``, ``bootstrap_samples``...): a
misspelled name is an error, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from depthprobe.errors import DepthprobeError

DEFAULT_NUM_SEQUENCES = 8  # windows of calibration text
DEFAULT_SEQ_LEN = 256  # tokens per window
DEFAULT_BATCH_SIZE = 4  # windows per forward pass: the memory knob
#: shrink's lazy greedy: candidates re-measured per step (None in the API: every candidate)
DEFAULT_REMEASURE = 8

#: what the streaming main pass measures (one forward, + backward for ``grad``)
PASS_METRICS = ("angular", "variance", "grad", "lens")
#: the sweeps: passes the main pass cannot do (registered in :data:`depthprobe.analysis.SWEEPS`)
SWEEP_METRICS = ("drop", "attribution", "probe", "tuned-lens")
#: data-free metrics: read the weights only (no text, no forward pass; ``depthprobe.analysis.WEIGHT_SWEEPS``)
WEIGHT_METRICS = ("spectra",)
#: every name ``--metrics`` accepts
ALL_METRICS = (*PASS_METRICS, *SWEEP_METRICS, *WEIGHT_METRICS)
DEFAULT_METRICS = PASS_METRICS
#: what ``depthprobe compare`` measures on each trained model
COMPARE_METRICS = ("angular", "variance", "grad", "lens", "drop")

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
class LinearProbeOptions:
    """``--metrics probe`` on a text model: the labels CSV (``depthprobe.probes.text_probe``)."""

    labels_file: str | None = None  # window[,position] and label columns


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


DEFAULT_LENS_TOPK = 5


@dataclass(frozen=True)
class LensOptions:
    """``--metrics tuned-lens`` (``--lens DIR``: a lens from ``depthprobe lens train`` or
    tuned-lens; none: one trained on the fly) and the per-position table ``lens_tokens.csv``
    (``--lens-positions``, ``--lens-topk``)."""

    lens_dir: str | None = None
    positions: tuple[int, ...] = ()  # window positions (negative: from the end); none: no table
    topk: int = DEFAULT_LENS_TOPK

    def __post_init__(self):
        object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))
        object.__setattr__(self, "lens_dir", str(self.lens_dir) if self.lens_dir is not None else None)
        if self.topk < 1:
            raise DepthprobeError(f"--lens-topk must be at least 1 (got {self.topk})")


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
    "labels_file": ("probe", "labels_file"),
    "lens": ("lens", "lens_dir"),
    "lens_positions": ("lens", "positions"),
    "lens_topk": ("lens", "topk"),
}


@dataclass(frozen=True)
class SweepOptions:
    """The options of every sweep, each group typed."""

    drop: DropOptions = field(default_factory=DropOptions)
    attribution: AttributionOptions = field(default_factory=AttributionOptions)
    bootstrap: BootstrapOptions = field(default_factory=BootstrapOptions)
    execution: ExecutionOptions = field(default_factory=ExecutionOptions)
    probe: LinearProbeOptions = field(default_factory=LinearProbeOptions)
    lens: LensOptions = field(default_factory=LensOptions)

    @classmethod
    def parse(cls, options: SweepOptions | Mapping | None) -> SweepOptions:
        """From a flat dict of :data:`OPTION_NAMES` (unknown names raise) or as given."""
        if isinstance(options, SweepOptions):
            return options
        groups: dict[str, dict] = {"drop": {}, "attribution": {}, "bootstrap": {}, "execution": {}, "probe": {},
                                   "lens": {}}
        for name, value in (options or {}).items():
            if name not in OPTION_NAMES:
                raise DepthprobeError(f"unknown analysis option {name!r}; known: {', '.join(OPTION_NAMES)}")
            if value is not None:
                group, attr = OPTION_NAMES[name]
                groups[group][attr] = value
        return cls(DropOptions(**groups["drop"]), AttributionOptions(**groups["attribution"]),
                   BootstrapOptions(**groups["bootstrap"]), ExecutionOptions(**groups["execution"]),
                   LinearProbeOptions(**groups["probe"]), LensOptions(**groups["lens"]))

    def flat(self) -> dict:
        """The flat form (what :meth:`parse` reads back), as saved in ``summary.json``."""
        return {name: _jsonable(getattr(getattr(self, group), attr)) for name, (group, attr) in OPTION_NAMES.items()}


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def split_items(value: str | Sequence | None) -> list:
    """``" a, b,,c"`` -> ``["a", "b", "c"]``: a comma list (or a list) with blank items
    skipped and strings stripped; other items are kept as given."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [v.strip() if isinstance(v, str) else v for v in items if not (isinstance(v, str) and not v.strip())]


def data_free(metrics: Sequence[str]) -> bool:
    """Whether every metric asked reads the weights only (no calibration text needed)."""
    return bool(metrics) and all(m in WEIGHT_METRICS for m in metrics)


def parse_metrics(metrics: str | Sequence[str]) -> tuple[str, ...]:
    """``"angular,grad"`` or a list -> a tuple without repeats (order kept)."""
    names = [str(m) for m in split_items(metrics)] if isinstance(metrics, str) else list(metrics)
    if not names:
        raise DepthprobeError("--metrics is empty; e.g. --metrics angular,variance,grad")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class ProbeConfig:
    """What to measure and on which tokens; saved in ``summary.json`` with every result."""

    metrics: tuple[str, ...] = DEFAULT_METRICS
    num_sequences: int = DEFAULT_NUM_SEQUENCES
    seq_len: int = DEFAULT_SEQ_LEN
    batch_size: int = DEFAULT_BATCH_SIZE
    text_file: str | None = None
    dataset: str | None = None  # NAME[:CONFIG[:SPLIT]]
    layers_path: str | None = None  # override where the blocks live
    options: SweepOptions = field(default_factory=SweepOptions)  # typed per-sweep options (a flat dict is parsed)

    def __post_init__(self):
        object.__setattr__(self, "metrics", parse_metrics(self.metrics))
        object.__setattr__(self, "text_file", str(self.text_file) if self.text_file else None)
        unknown = [m for m in self.metrics if m not in ALL_METRICS]
        if unknown:
            raise DepthprobeError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(sorted(ALL_METRICS))}")
        if self.batch_size < 1:
            raise DepthprobeError(f"--batch-size must be at least 1 (got {self.batch_size})")
        object.__setattr__(self, "options", SweepOptions.parse(self.options))

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "metrics": list(self.metrics), "options": self.options.flat()}


@dataclass(frozen=True)
class RunOptions:
    """How one :func:`~depthprobe.analyze` call runs, apart from what it measures (not saved
    with the result)."""

    progress: bool = True  # tqdm bars (rank 0 only under torchrun)
    progress_dir: str | None = None  # the drop sweep appends finished batches to drop_progress.jsonl here
    resume: bool = False  # continue from the progress file in progress_dir instead of restarting
    loss: bool | None = None  # compute the base loss (default: when a metric other than angular/variance is asked)
    model_name: str | None = None  # the name in summary.json (default: the model's own)


#: the keyword form of ``analyze`` (deprecated): ProbeConfig and RunOptions fields by name
PROBE_FIELDS = tuple(f.name for f in dataclasses.fields(ProbeConfig))
RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunOptions))


def keyword_overrides(function: str, keywords: Mapping, *groups: tuple[str, ...]) -> list[dict]:
    """The deprecated keyword form of ``function`` (``analyze(model, tok, metrics=...)``):
    ``keywords`` split by the field names of each group, in order. A keyword in no group is a
    TypeError, as Python's own; any keyword at all warns (the form goes in the next release)."""
    unknown = [k for k in keywords if not any(k in group for group in groups)]
    if unknown:
        raise TypeError(f"{function}() got an unexpected keyword argument {unknown[0]!r}")
    if keywords:
        warnings.warn(f"{function}(..., name=value) is deprecated: pass its config and run=RunOptions(...) "
                      "(the keywords go in the next release)", DeprecationWarning, stacklevel=4)
    return [{k: v for k, v in keywords.items() if k in group} for group in groups]
