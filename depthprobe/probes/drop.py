"""Drop sweeps with prefix caching: what each block (and sublayer, and run of blocks) is worth.

``drop_delta_loss[l]`` = loss of the model without block l − loss of the full model, on the
same tokens (mean-token LM loss; for encoders the mean cosine drift 1 − cos of the final
hidden state against the full model's, so the full model scores 0).

The sweep is written once, over the list of drops (:func:`~depthprobe.probes.drop_tables.drop_variants`),
against a schedule:

- batch-major (:class:`~depthprobe.probes.batch_major.BatchMajor`): one full pass per batch
  stores every block's input x_l; dropping block l then runs only blocks l+1..L−1 from x_l
  through the model's own forward (``LayerStack.start_at``), so a sweep over L blocks costs
  about L/2 full passes instead of L. Dropping the attention or MLP sublayer of block l runs
  blocks l..L−1 from x_l with that sublayer's output zeroed; removing the contiguous run
  l..l+n−1 (Gromov et al. 2024) runs blocks l+n.. from x_l. Memory holds one batch's states;
  each finished batch is journaled.
- layer-major (:class:`~depthprobe.probes.layer_major.LayerMajor`): every variant's stream
  advances block by block, each block's weights read once per sweep; the live streams are
  journaled after each block.

Either way a killed sweep resumes from its journal (``progress_file``) with the same numbers.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from depthprobe.journal import Journal
from depthprobe.model.stack import LayerStack
from depthprobe.probes.batch import Batch, batches_of
from depthprobe.probes.drop_tables import (
    DropRecord,
    DropSweepResult,
    DropTables,
    Variant,
    can_drop_sublayers,
    drop_variants,
)
from depthprobe.probes.hooks import evaluating, watch_blocks
from depthprobe.probes.objective import Objective, objective_for
from depthprobe.probes.offload import use_layer_major
from depthprobe.probes.sweep import DEFAULT_BLOCK_SIZES, ExecutionOptions, SweepContext, SweepOutput

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_BLOCK_SIZES", "BatchScorer", "DropPlan", "DropRecord", "DropSweepResult", "capture_states",
           "drop_sweep", "run_drop_sweep", "run_drop_sweep_layer_major"]


@dataclass
class BatchScorer:
    """Per-window objective (:class:`Objective`) of a model run on one batch."""

    objective: Objective
    batch: Batch
    reference: torch.Tensor | None = None  # encoders: the full model's final hidden state

    def from_output(self, out) -> np.ndarray:
        return self.objective.window_scores(out, self.batch, self.reference)

    def from_stream(self, hidden: torch.Tensor) -> np.ndarray:
        """Score a residual-stream state as if it were the last block's output."""
        return self.objective.stream_scores(hidden, self.batch, self.reference)

    def run(self, start: int, hidden: torch.Tensor, keep: Sequence[int] | None = None) -> np.ndarray:
        """Objective when blocks ``keep`` (default ``start..L-1``) run on ``hidden``."""
        stack = self.objective.stack
        keep = list(range(start, len(stack))) if keep is None else list(keep)
        if not keep:
            return self.from_stream(hidden)
        with stack.start_at(keep[0], hidden, keep=keep):
            return self.from_output(self.objective.forward(self.batch))


def capture_states(objective: Objective, batch: Batch, keep: Sequence[int] | None = None):
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
        out = objective.forward(batch)
    return states, out


@dataclass(frozen=True)
class DropPlan:
    """The drops of one sweep: every :class:`Variant`, and the shape of its records."""

    variants: list[Variant]
    num_layers: int
    sublayers: bool
    block_sizes: list[int]

    @classmethod
    def of(cls, stack: LayerStack, sublayers: bool, block_sizes: Sequence[int]) -> DropPlan:
        can_sublayer = can_drop_sublayers(stack, sublayers)
        block_sizes = list(block_sizes)
        return cls(drop_variants(stack, can_sublayer, block_sizes), len(stack), can_sublayer, block_sizes)

    def record(self, size: int) -> DropRecord:
        """An empty record for a batch of ``size`` windows."""
        return DropRecord.empty(self.num_layers, size, self.sublayers, self.block_sizes)


def drop_sweep(ctx: SweepContext) -> SweepOutput:
    """``--metrics drop``: single-block, sublayer and contiguous-block drop sweeps
    (options: :class:`~depthprobe.probes.sweep.DropOptions`; layer-major when offloaded,
    :class:`~depthprobe.probes.sweep.ExecutionOptions`)."""
    options = ctx.options.drop
    block_sizes = [n for n in options.block_sizes if 1 < n < len(ctx.stack)]
    result = run_drop_sweep(ctx.stack, ctx.windows, batch_size=ctx.batch_size, sublayers=options.sublayers,
                            block_sizes=block_sizes, progress_file=options.progress_file, progress=ctx.progress,
                            execution=ctx.options.execution)
    tables = {"drop_windows": result.windows_table()}
    if result.block_sizes:
        tables["block_drop"] = result.block_table()
    return SweepOutput(columns=result.columns(), tables=tables, summary={"drop_base_loss": float(result.base.mean())},
                       seconds=result.seconds)


def run_drop_sweep(
    stack: LayerStack,
    input_ids,
    *,
    batch_size: int = 4,
    sublayers: bool = True,
    block_sizes: Sequence[int] = (),
    progress_file: str | Path | None = None,
    progress: bool = True,
    execution: ExecutionOptions | None = None,
) -> DropSweepResult:
    """Per-window objective of every single-block, sublayer and contiguous-block drop.

    ``input_ids``: ``(N, T)`` token windows (or a :class:`~depthprobe.data.Windows`);
    ``execution``: batch-major (default) or layer-major, and the layer-major store's budget.
    With ``progress_file`` finished work is journaled there and a rerun resumes from it.
    """
    from depthprobe.probes.main_pass import make_schedule

    execution = execution or ExecutionOptions(order="batch")
    order = "layer" if use_layer_major(execution.order, stack.model) else "batch"
    objective = objective_for(stack)
    batches = batches_of(input_ids, batch_size)
    plan = DropPlan.of(stack, sublayers, block_sizes)
    schedule = make_schedule(order, objective, batches, progress, execution.state_budget, execution.spill_dir)
    fingerprint = _fingerprint(stack, batches, plan.sublayers, plan.block_sizes)
    journal = Journal(progress_file, fingerprint if order == "batch" else f"{fingerprint}:layer:{batch_size}",
                      what="sweep")
    tables = DropTables(plan.num_layers, batches[-1].rows.stop, plan.sublayers, plan.block_sizes)
    t0 = time.perf_counter()
    with evaluating(stack.model), torch.no_grad():
        for batch, record in schedule.drop_sweep(plan, journal):
            tables.put(batch.rows, record)
    return tables.result(sum(objective.tokens(b) for b in batches), time.perf_counter() - t0)


def run_drop_sweep_layer_major(stack: LayerStack, input_ids: torch.Tensor, *, batch_size: int = 4,
                               sublayers: bool = True, block_sizes: Sequence[int] = (), progress: bool = True,
                               budget: int | None = None, spill_dir: str | Path | None = None) -> DropSweepResult:
    """Deprecated (one release): ``run_drop_sweep(..., execution=ExecutionOptions("layer", budget, spill_dir))``."""
    execution = ExecutionOptions(order="layer", state_budget=budget, spill_dir=None if spill_dir is None else str(spill_dir))
    return run_drop_sweep(stack, input_ids, batch_size=batch_size, sublayers=sublayers, block_sizes=block_sizes,
                          progress=progress, execution=execution)


def _fingerprint(stack: LayerStack, data, sublayers: bool, block_sizes) -> str:
    """Identifies a sweep: same model structure, same inputs, same sweep options (``data``:
    token ids, or the sweep's batches)."""
    h = hashlib.sha256()
    if isinstance(data, torch.Tensor):
        h.update(data.numpy().tobytes())
    else:
        for batch in data:
            for tensor in batch.inputs.values():
                h.update(tensor.numpy().tobytes())
    h.update(f"{type(stack.model).__name__}:{len(stack)}:{sublayers}:{list(block_sizes)}".encode())
    # weights offloaded by accelerate are meta tensors (no data): use the first resident one
    first = next((p for p in stack.blocks.parameters() if not p.is_meta), None)
    if first is not None:
        h.update(first.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
