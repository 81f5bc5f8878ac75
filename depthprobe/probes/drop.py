"""Drop sweeps with prefix caching: what each block (and sublayer, and run of blocks) is worth.

``drop_delta_loss[l]`` = loss of the model without block l − loss of the full model, on the
same tokens (mean-token LM loss; for encoders the mean cosine drift 1 − cos of the final
hidden state against the full model's, so the full model scores 0).

One full pass per batch stores every block's input x_l. Dropping block l then runs only
blocks l+1..L−1 from x_l through the model's own forward (``LayerStack.start_at``), so a
sweep over L blocks costs about L/2 full passes instead of L. Dropping the attention or MLP
sublayer of block l runs blocks l..L−1 from x_l with that sublayer's output zeroed.
Removing the contiguous run l..l+n−1 (Gromov et al. 2024) runs blocks l+n.. from x_l.

Batches are the outer loop, so memory holds one batch's L+1 states whatever the number of
windows; each finished batch is appended to an optional progress file, and a resumed sweep
skips the batches already there.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from depthprobe import distributed
from depthprobe.journal import Journal
from depthprobe.model.stack import LayerStack
from depthprobe.probes import metrics as M
from depthprobe.probes.hooks import watch_blocks, zero_output
from depthprobe.probes.layer_major import (
    BlockRunner,
    batch_slices,
    open_store,
    outside_blocks,
    resident,
    use_layer_major,
)
from depthprobe.probes.objective import Objective
from depthprobe.probes.sweep import DEFAULT_BLOCK_SIZES, SweepContext, SweepOutput

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_BLOCK_SIZES", "BatchScorer", "DropSweepResult", "capture_states", "drop_sweep", "run_drop_sweep",
           "run_drop_sweep_layer_major"]


@dataclass
class BatchScorer:
    """Per-window objective (:class:`Objective`) of a model run on one batch."""

    objective: Objective
    input_ids: torch.Tensor
    reference: torch.Tensor | None = None  # encoders: the full model's final hidden state

    def from_output(self, out) -> np.ndarray:
        return self.objective.window_scores(out, self.input_ids, self.reference)

    def from_stream(self, hidden: torch.Tensor) -> np.ndarray:
        """Score a residual-stream state as if it were the last block's output."""
        return self.objective.stream_scores(hidden, self.input_ids, self.reference)

    def run(self, start: int, hidden: torch.Tensor, keep: Sequence[int] | None = None) -> np.ndarray:
        """Objective when blocks ``keep`` (default ``start..L-1``) run on ``hidden``."""
        stack = self.objective.stack
        keep = list(range(start, len(stack))) if keep is None else list(keep)
        if not keep:
            return self.from_stream(hidden)
        with stack.start_at(keep[0], hidden, keep=keep):
            return self.from_output(self.objective.forward(self.input_ids))


def capture_states(objective: Objective, input_ids: torch.Tensor, keep: Sequence[int] | None = None):
    """One forward pass; returns ``(states, out)`` with ``states[l]`` the input of block l
    (``states[L]`` the last block's output), for the blocks in ``keep`` (default: all)."""
    stack = objective.stack
    keep = list(range(len(stack))) if keep is None else list(keep)
    states: dict[int, torch.Tensor] = {}

    def record(layer, x_in, x_out):
        states[layer] = x_in.detach()
        if layer == keep[-1]:
            states[len(stack)] = x_out.detach()

    with stack.keep_blocks(keep), watch_blocks(stack, record, layers=keep):
        out = objective.forward(input_ids)
    return states, out


def drop_sweep(ctx: SweepContext) -> SweepOutput:
    """``--metrics drop``: single-block, sublayer and contiguous-block drop sweeps
    (options: :class:`~depthprobe.probes.sweep.DropOptions`; layer-major when offloaded,
    :class:`~depthprobe.probes.sweep.ExecutionOptions`)."""
    options, execution = ctx.options.drop, ctx.options.execution
    block_sizes = [n for n in options.block_sizes if 1 < n < len(ctx.stack)]
    if use_layer_major(execution.order, ctx.stack.model):
        if options.progress_file:
            log.info("layer-major drop sweep: no progress file (every variant finishes with the last block)")
        result = run_drop_sweep_layer_major(ctx.stack, ctx.windows.input_ids, batch_size=ctx.batch_size,
                                            sublayers=options.sublayers, block_sizes=block_sizes,
                                            progress=ctx.progress, budget=execution.state_budget,
                                            spill_dir=execution.spill_dir)
    else:
        result = run_drop_sweep(ctx.stack, ctx.windows.input_ids, batch_size=ctx.batch_size,
                                sublayers=options.sublayers, block_sizes=block_sizes,
                                progress_file=options.progress_file, progress=ctx.progress)
    tables = {"drop_windows": result.windows_table()}
    if result.block_sizes:
        tables["block_drop"] = result.block_table()
    return SweepOutput(columns=result.columns(), tables=tables, summary={"drop_base_loss": float(result.base.mean())},
                       seconds=result.seconds)


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


class _DropTables:
    """The sweep's arrays, filled batch by batch from records (fresh or read back from the
    progress file: one format, so a resumed sweep gives the same numbers)."""

    def __init__(self, num_layers: int, n_windows: int, sublayers: bool, block_sizes: list[int]):
        self.base = np.full(n_windows, np.nan)
        self.block = np.full((num_layers, n_windows), np.nan)
        self.attn = np.full((num_layers, n_windows), np.nan) if sublayers else None
        self.mlp = np.full((num_layers, n_windows), np.nan) if sublayers else None
        self.block_sizes = block_sizes
        self.runs = {n: np.full((num_layers - n + 1, n_windows), np.nan) for n in block_sizes}
        self.ang_sums = {n: np.zeros(num_layers - n + 1) for n in block_sizes}

    def put(self, win: slice, record: dict) -> None:
        self.base[win], self.block[:, win] = record["base"], record["block"]
        if self.attn is not None:
            self.attn[:, win], self.mlp[:, win] = record["attn"], record["mlp"]
        for n in self.block_sizes:
            self.runs[n][:, win] = record["runs"][str(n)]
            self.ang_sums[n] += np.asarray(record["ang"][str(n)])

    def result(self, n_tokens: int, seconds: float) -> DropSweepResult:
        """The sweep's result; under torchrun, every process's windows gathered in window
        order and the angle sums summed (:mod:`depthprobe.distributed`)."""
        n_tokens = int(distributed.reduce_sum(n_tokens))
        angles = {n: distributed.reduce_sum(self.ang_sums[n]) / n_tokens for n in self.block_sizes}
        sub = [distributed.gather(a) if a is not None else None for a in (self.attn, self.mlp)]
        runs = {n: distributed.gather(r) for n, r in self.runs.items()}
        return DropSweepResult(distributed.gather(self.base), distributed.gather(self.block), *sub, self.block_sizes,
                               runs, angles, seconds)


def _sweep_batch(objective: Objective, ids: torch.Tensor, sublayers: bool, block_sizes: list[int], bar) -> dict:
    """Every drop on one batch, from one prefix pass: the record kept in the progress file."""
    stack = objective.stack
    num_layers = len(stack)
    states, out = capture_states(objective, ids)
    scorer = BatchScorer(objective, ids, objective.reference(out))
    record = {"base": scorer.from_output(out).tolist(), "block": [], "attn": [] if sublayers else None,
              "mlp": [] if sublayers else None, "runs": {}, "ang": {}}
    for layer in range(num_layers):
        record["block"].append(scorer.run(layer + 1, states[layer]).tolist())
        bar.update()
        if sublayers:
            for kind in ("attn", "mlp"):
                module = stack.sublayer_output_module(layer, kind)
                if module is None:  # a block without this sublayer (hybrids): not applicable
                    record[kind].append([float("nan")] * ids.shape[0])
                else:
                    with zero_output(module):
                        record[kind].append(scorer.run(layer, states[layer]).tolist())
                bar.update()
    for n in block_sizes:
        runs, angles = [], []
        for first in range(num_layers - n + 1):
            runs.append(scorer.run(first + n, states[first]).tolist())
            angles.append(M.angular_sum(states[first], states[first + n]))
            bar.update()
        record["runs"][str(n)], record["ang"][str(n)] = runs, angles
    return record


def run_drop_sweep(
    stack: LayerStack,
    input_ids: torch.Tensor,
    *,
    batch_size: int = 4,
    sublayers: bool = True,
    block_sizes: Sequence[int] = (),
    progress_file: str | Path | None = None,
    progress: bool = True,
) -> DropSweepResult:
    """Per-window objective of every single-block, sublayer and contiguous-block drop."""
    objective = Objective(stack)
    num_layers, n_windows = len(stack), input_ids.shape[0]
    # sublayer drops where a block has a separable sublayer; the other cells stay empty
    can_sublayer = sublayers and any(stack.sublayer_layers(k, droppable=True) for k in ("attn", "mlp"))
    block_sizes = list(block_sizes)
    done = Journal(progress_file, _fingerprint(stack, input_ids, can_sublayer, block_sizes), what="sweep")
    tables = _DropTables(num_layers, n_windows, can_sublayer, block_sizes)
    steps_per_batch = num_layers * (1 + 2 * can_sublayer) + sum(num_layers - n + 1 for n in block_sizes)
    n_batches = -(-n_windows // batch_size)
    bar = tqdm(total=n_batches * steps_per_batch, desc="drop sweep", disable=not progress, leave=False, delay=0.5)
    t0 = time.perf_counter()
    was_training = stack.model.training
    stack.model.eval()
    try:
        with torch.no_grad():
            for start in range(0, n_windows, batch_size):
                win = slice(start, min(start + batch_size, n_windows))
                record = done.get(start)
                if record is None:
                    ids = input_ids[win].to(objective.device)
                    record = _sweep_batch(objective, ids, can_sublayer, block_sizes, bar)
                    done.append(start, record)
                else:
                    bar.update(steps_per_batch)
                tables.put(win, record)
    finally:
        bar.close()
        stack.model.train(was_training)
    return tables.result(input_ids.numel(), time.perf_counter() - t0)


@dataclass(frozen=True)
class _Variant:
    """One drop of the layer-major sweep: blocks ``layer..layer+size-1`` removed (``block``,
    ``run``), or the ``attn`` / ``mlp`` sublayer of block ``layer`` zeroed (size 0)."""

    kind: str
    layer: int
    size: int

    @property
    def start(self) -> int:
        """The first block this variant's stream runs through."""
        return self.layer + self.size


def _variants(stack: LayerStack, sublayers: bool, block_sizes: Sequence[int]) -> list[_Variant]:
    num_layers = len(stack)
    found = [_Variant("block", layer, 1) for layer in range(num_layers)]
    if sublayers:
        found += [_Variant(kind, layer, 0) for layer in range(num_layers) for kind in ("attn", "mlp")
                  if stack.sublayer_output_module(layer, kind) is not None]
    found += [_Variant("run", first, n) for n in block_sizes for first in range(num_layers - n + 1)]
    return found


def run_drop_sweep_layer_major(stack: LayerStack, input_ids: torch.Tensor, *, batch_size: int = 4,
                               sublayers: bool = True, block_sizes: Sequence[int] = (), progress: bool = True,
                               budget: int | None = None, spill_dir: str | Path | None = None) -> DropSweepResult:
    """:func:`run_drop_sweep` with each block's weights read once per sweep.

    Blocks run in order. Entering block l, every variant that removes something starting at
    l takes a copy of the full model's stream x_l; then block l runs on the full stream and
    on every variant stream that has reached it (with the sublayer zeroed for that block's
    sublayer variants). After the last block every stream is scored. The streams (one per
    variant, ``(N, T, d)`` each) live in a :class:`StateStore`, memory-mapped when they
    exceed ``budget`` bytes. Same numbers as the batch-major sweep.
    """
    objective, num_layers, n_windows = Objective(stack), len(stack), input_ids.shape[0]
    can_sublayer = sublayers and any(stack.sublayer_layers(k, droppable=True) for k in ("attn", "mlp"))
    variants, block_sizes = _variants(stack, can_sublayer, block_sizes), list(block_sizes)
    tables = _DropTables(num_layers, n_windows, can_sublayer, block_sizes)
    slices, runner = batch_slices(n_windows, batch_size), BlockRunner(objective)
    steps = len(slices) * sum(1 + sum(v.start <= k for v in variants) for k in range(num_layers))
    bar = tqdm(total=steps, desc="drop sweep (layer-major)", disable=not progress, leave=False, delay=0.5)
    angles: dict[tuple[int, int], list[float]] = {}  # (size, first) -> per batch: sum of d(x_first, x_first+size)
    t0, was_training = time.perf_counter(), stack.model.training
    stack.model.eval()
    try:
        with torch.no_grad(), resident(outside_blocks(stack, "prelude")), \
                open_store(runner, input_ids, batch_size, 1 + len(variants), budget, spill_dir) as store:
            for layer in range(num_layers):
                _advance(runner, store.data, variants, layer, input_ids, slices, angles, bar)
            with resident(outside_blocks(stack, "output")):  # final norm and head, read once
                for index, win in enumerate(slices):
                    batch_angles = {key: sums[index] for key, sums in angles.items()}
                    tables.put(win, _score_layer_major(objective, store.data, variants, input_ids[win], win,
                                                       batch_angles, tables))
    finally:
        bar.close()
        stack.model.train(was_training)
    return tables.result(input_ids.numel(), time.perf_counter() - t0)


def _advance(runner: BlockRunner, data: torch.Tensor, variants: list[_Variant], layer: int, input_ids: torch.Tensor,
             slices: list[slice], angles: dict, bar) -> None:
    """Run block ``layer`` on the full stream (slot 0) and every variant stream that reached it."""
    stack, device = runner.stack, runner.objective.device
    for slot, v in enumerate(variants, 1):
        if v.layer == layer:  # the variant starts from the full model's x_layer
            data[slot].copy_(data[0])
    live = [(slot, v) for slot, v in enumerate(variants, 1) if v.start <= layer]
    with runner.at(layer):
        for win in slices:
            ids = input_ids[win].to(device)
            for slot, v in live:
                if v.kind == "run" and v.start == layer:  # x_first (unchanged so far) against x_{first+n}
                    angles.setdefault((v.size, v.layer), []).append(M.angular_sum(data[slot, win], data[0, win]))
                zeroed = v.kind in ("attn", "mlp") and v.layer == layer
                with zero_output(stack.sublayer_output_module(layer, v.kind)) if zeroed else contextlib.nullcontext():
                    data[slot, win] = runner.run(ids, data[slot, win].to(device)).cpu()
                bar.update()
            data[0, win] = runner.run(ids, data[0, win].to(device)).cpu()
            bar.update()


def _score_layer_major(objective: Objective, data: torch.Tensor, variants: list[_Variant], ids: torch.Tensor,
                       win: slice, angles: dict, tables: _DropTables) -> dict:
    """The progress-file record of one batch from the final streams."""
    num_layers, device = len(objective.stack), objective.device
    ids = ids.to(device)
    final = data[0, win].to(device)
    scorer = BatchScorer(objective, ids, None if objective.lm else objective.stack.final_hidden(final))
    nan_rows = [[float("nan")] * ids.shape[0] for _ in range(num_layers)]
    record = {"base": scorer.from_stream(final).tolist(), "block": [None] * num_layers,
              "attn": list(nan_rows) if tables.attn is not None else None,
              "mlp": list(nan_rows) if tables.mlp is not None else None,
              "runs": {str(n): [None] * (num_layers - n + 1) for n in tables.block_sizes},
              "ang": {str(n): [0.0] * (num_layers - n + 1) for n in tables.block_sizes}}
    for slot, v in enumerate(variants, 1):
        scores = scorer.from_stream(data[slot, win].to(device)).tolist()
        if v.kind == "run":
            record["runs"][str(v.size)][v.layer] = scores
            record["ang"][str(v.size)][v.layer] = (angles[(v.size, v.layer)] if v.start < num_layers
                                                   else M.angular_sum(data[slot, win], data[0, win]))
        else:
            record[v.kind][v.layer] = scores
    return record


def _fingerprint(stack: LayerStack, input_ids: torch.Tensor, sublayers: bool, block_sizes) -> str:
    """Identifies a sweep: same model structure, same tokens, same sweep options."""
    h = hashlib.sha256()
    h.update(input_ids.numpy().tobytes())
    h.update(f"{type(stack.model).__name__}:{len(stack)}:{sublayers}:{list(block_sizes)}".encode())
    # weights offloaded by accelerate are meta tensors (no data): use the first resident one
    first = next((p for p in stack.blocks.parameters() if not p.is_meta), None)
    if first is not None:
        h.update(first.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]

