"""What a drop sweep measures, typed: the drop variants, one batch's record, the sweep's tables.

Both schedules (batch-major and layer-major) run the same list of :class:`Variant` drops and
fill one :class:`DropRecord` per batch, the unit a resumed batch-major sweep reads back from
its journal; :class:`DropTables` collects the records into a :class:`DropSweepResult`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from depthprobe import distributed
from depthprobe.model.stack import LayerStack

SUBLAYER_KINDS = ("attn", "mlp")


@dataclass(frozen=True)
class Variant:
    """One drop: blocks ``layer..layer+size-1`` removed (``block``: size 1, ``run``: size n),
    or the ``attn`` / ``mlp`` sublayer of block ``layer`` zeroed (size 0)."""

    kind: str
    layer: int
    size: int

    @property
    def start(self) -> int:
        """The first block this variant's stream runs through."""
        return self.layer + self.size


def drop_variants(stack: LayerStack, sublayers: bool, block_sizes: Sequence[int]) -> list[Variant]:
    """Every drop of a sweep: single blocks, separable sublayers (with ``sublayers``), runs."""
    num_layers = len(stack)
    found = [Variant("block", layer, 1) for layer in range(num_layers)]
    if sublayers:
        found += [Variant(kind, layer, 0) for layer in range(num_layers) for kind in SUBLAYER_KINDS
                  if stack.sublayer_output_module(layer, kind) is not None]
    found += [Variant("run", first, n) for n in block_sizes for first in range(num_layers - n + 1)]
    return found


def can_drop_sublayers(stack: LayerStack, sublayers: bool) -> bool:
    """Sublayer drops where some block has a separable sublayer (other cells stay empty)."""
    return sublayers and any(stack.sublayer_layers(k, droppable=True) for k in SUBLAYER_KINDS)


@dataclass(frozen=True)
class DropPlan:
    """The drops of one sweep: every :class:`Variant`, and the shape of its records."""

    variants: list[Variant]
    num_layers: int
    sublayers: bool
    block_sizes: list[int]
    is_subset: bool = False  # some of the sweep's drops only (the others' cells stay NaN)

    def subset(self, variants) -> DropPlan:
        """This plan with only ``variants`` (in the plan's order)."""
        wanted = set(variants)
        return DropPlan([v for v in self.variants if v in wanted], self.num_layers, self.sublayers,
                        self.block_sizes, True)

    @classmethod
    def of(cls, stack: LayerStack, sublayers: bool, block_sizes: Sequence[int]) -> DropPlan:
        can_sublayer = can_drop_sublayers(stack, sublayers)
        block_sizes = list(block_sizes)
        return cls(drop_variants(stack, can_sublayer, block_sizes), len(stack), can_sublayer, block_sizes)

    def record(self, size: int) -> DropRecord:
        """An empty record for a batch of ``size`` windows."""
        return DropRecord.empty(self.num_layers, size, self.sublayers, self.block_sizes)


@dataclass
class DropRecord:
    """Per-window objectives of one batch of ``B`` windows: the full model (``base``, ``(B,)``),
    every block drop (``block``, ``(L, B)``), sublayer drops (NaN where a block has none), every
    run of ``n`` blocks (``runs[n]``, ``(L-n+1, B)``) and the summed angular distance
    d(x_l, x_{l+n}) over the batch's tokens (``angles[n]``, ``(L-n+1,)``)."""

    base: list[float]
    block: list[list[float] | None]
    attn: list[list[float]] | None = None
    mlp: list[list[float]] | None = None
    runs: dict[int, list[list[float] | None]] = field(default_factory=dict)
    angles: dict[int, list[float]] = field(default_factory=dict)

    @classmethod
    def empty(cls, num_layers: int, size: int, sublayers: bool, block_sizes: Sequence[int]) -> DropRecord:
        nan_rows = [[float("nan")] * size for _ in range(num_layers)]
        return cls([], list(nan_rows), list(nan_rows) if sublayers else None,
                   list(nan_rows) if sublayers else None,
                   {n: [None] * (num_layers - n + 1) for n in block_sizes},
                   {n: [0.0] * (num_layers - n + 1) for n in block_sizes})

    def set(self, variant: Variant, scores: list[float]) -> None:
        if variant.kind == "run":
            self.runs[variant.size][variant.layer] = scores
        else:
            getattr(self, variant.kind)[variant.layer] = scores

    def set_angle(self, variant: Variant, angle_sum: float) -> None:
        self.angles[variant.size][variant.layer] = angle_sum

    def to_json(self) -> dict:
        """The journal form (string keys for the run sizes, as JSON needs)."""
        return {"base": self.base, "block": self.block, "attn": self.attn, "mlp": self.mlp,
                "runs": {str(n): v for n, v in self.runs.items()}, "ang": {str(n): v for n, v in self.angles.items()}}

    @classmethod
    def from_json(cls, data: dict) -> DropRecord:
        return cls(data["base"], data["block"], data["attn"], data["mlp"],
                   {int(n): v for n, v in data["runs"].items()}, {int(n): v for n, v in data["ang"].items()})


@dataclass
class DropSweepResult:
    """Per-window objectives of the full model and of every drop, shape ``(N,)`` / ``(L, N)``."""

    base: np.ndarray
    block: np.ndarray
    attn: np.ndarray | None
    mlp: np.ndarray | None
    block_sizes: list[int]
    runs: dict[int, np.ndarray]  # n -> (L-n+1, N) objective with blocks l..l+n-1 removed
    run_angles: dict[int, np.ndarray]  # n -> (L-n+1,) mean angular distance d(x_l, x_{l+n})
    seconds: float
    #: drops the model's own forward refused (their cells NaN) -> the one-line reason
    refused: dict[Variant, str] = field(default_factory=dict)

    def refused_notes(self) -> dict[str, str]:
        """``column -> why`` for the columns with refused drops (``block_drop``: runs)."""
        by_column: dict[str, list[Variant]] = {}
        for v in self.refused:
            column = {"block": "drop_delta_loss", "run": "block_drop"}.get(v.kind, f"drop_delta_loss_{v.kind}")
            by_column.setdefault(column, []).append(v)
        return {column: ("not computed for " + ", ".join(
                    f"blocks {v.layer}-{v.layer + v.size - 1}" if v.kind == "run" else f"block {v.layer}" for v in vs)
                    + f": the model's forward fails without them ({self.refused[vs[0]]})")
                for column, vs in by_column.items()}

    def columns(self) -> dict[str, np.ndarray]:
        cols = {"drop_delta_loss": (self.block - self.base).mean(1)}
        for name, arr in (("drop_delta_loss_attn", self.attn), ("drop_delta_loss_mlp", self.mlp)):
            if arr is not None:
                cols[name] = (arr - self.base).mean(1)
        return cols

    def windows_table(self) -> pd.DataFrame:
        num_layers, n = self.block.shape
        frame = {
            "layer": np.repeat(np.arange(num_layers), n),
            "window": np.tile(np.arange(n), num_layers),
            "delta_loss": (self.block - self.base).ravel(),
        }
        if self.attn is not None:
            frame["delta_loss_attn"] = (self.attn - self.base).ravel()
        if self.mlp is not None:
            frame["delta_loss_mlp"] = (self.mlp - self.base).ravel()
        return pd.DataFrame(frame)

    def block_table(self) -> pd.DataFrame:
        rows = []
        for n in self.block_sizes:
            for start, (obj, ang) in enumerate(zip(self.runs[n], self.run_angles[n], strict=True)):
                rows.append(
                    {"block_size": n, "start": start, "end": start + n - 1,
                     "delta_loss": float((obj - self.base).mean()), "angular_distance": float(ang)}
                )
        return pd.DataFrame(rows, columns=["block_size", "start", "end", "delta_loss", "angular_distance"])


class DropTables:
    """The sweep's arrays, filled batch by batch from :class:`DropRecord` objects (fresh or
    read back from the journal: one format, so a resumed sweep gives the same numbers)."""

    def __init__(self, num_layers: int, n_windows: int, sublayers: bool, block_sizes: list[int]):
        self.base = np.full(n_windows, np.nan)
        self.block = np.full((num_layers, n_windows), np.nan)
        self.attn = np.full((num_layers, n_windows), np.nan) if sublayers else None
        self.mlp = np.full((num_layers, n_windows), np.nan) if sublayers else None
        self.block_sizes = block_sizes
        self.runs = {n: np.full((num_layers - n + 1, n_windows), np.nan) for n in block_sizes}
        self.ang_sums = {n: np.zeros(num_layers - n + 1) for n in block_sizes}

    def put(self, win: slice, record: DropRecord) -> None:
        self.base[win], self.block[:, win] = record.base, record.block
        if self.attn is not None:
            self.attn[:, win], self.mlp[:, win] = record.attn, record.mlp
        for n in self.block_sizes:
            self.runs[n][:, win] = record.runs[n]
            self.ang_sums[n] += np.asarray(record.angles[n])

    def result(self, n_tokens: int, seconds: float) -> DropSweepResult:
        """The sweep's result; under torchrun, every process's windows gathered in window
        order and the angle sums summed (:mod:`depthprobe.distributed`)."""
        n_tokens = int(distributed.reduce_sum(n_tokens))
        angles = {n: distributed.reduce_sum(self.ang_sums[n]) / n_tokens for n in self.block_sizes}
        sub = [distributed.gather(a) if a is not None else None for a in (self.attn, self.mlp)]
        runs = {n: distributed.gather(r) for n, r in self.runs.items()}
        return DropSweepResult(distributed.gather(self.base), distributed.gather(self.block), *sub, self.block_sizes,
                               runs, angles, seconds)
