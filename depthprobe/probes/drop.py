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
from pathlib import Path

import torch

from depthprobe.journal import Journal
from depthprobe.model.stack import LayerStack
from depthprobe.probes.batch import batches_of, num_windows
from depthprobe.probes.drop_tables import DropPlan, DropRecord, DropSweepResult, DropTables
from depthprobe.probes.hooks import evaluating
from depthprobe.probes.objective import objective_for
from depthprobe.probes.offload import use_layer_major
from depthprobe.probes.schedules import make_schedule
from depthprobe.probes.scoring import BatchScorer, capture_states  # noqa: F401 - their home before
from depthprobe.probes.sweep import DEFAULT_BLOCK_SIZES, ExecutionOptions, SweepContext, SweepOutput

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_BLOCK_SIZES", "BatchScorer", "DropPlan", "DropRecord", "DropSweepResult", "capture_states",
           "drop_sweep", "run_drop_plan", "run_drop_sweep", "run_drop_sweep_layer_major"]


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
                       seconds=result.seconds, not_applicable=result.refused_notes())


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
    return run_drop_plan(stack, input_ids, DropPlan.of(stack, sublayers, block_sizes), batch_size=batch_size,
                         progress_file=progress_file, progress=progress, execution=execution)


def run_drop_plan(stack: LayerStack, input_ids, plan: DropPlan, *, batch_size: int = 4,
                  progress_file: str | Path | None = None, progress: bool = True,
                  execution: ExecutionOptions | None = None) -> DropSweepResult:
    """The drops of ``plan`` (all of a sweep's, or a subset: ``plan.subset(variants)``; the
    cells of drops not in it stay NaN), through the same schedules as :func:`run_drop_sweep`."""
    execution = execution or ExecutionOptions(order="batch")
    order = "layer" if use_layer_major(execution.order, stack.model) else "batch"
    objective = objective_for(stack)
    batches = batches_of(input_ids, batch_size)
    schedule = make_schedule(order, objective, batches, progress, execution.state_budget, execution.spill_dir)
    fingerprint = _fingerprint(stack, batches, plan.sublayers, plan.block_sizes)
    if plan.is_subset:
        fingerprint += ":" + hashlib.sha256(repr(plan.variants).encode()).hexdigest()[:8]
    journal = Journal(progress_file, fingerprint if order == "batch" else f"{fingerprint}:layer:{batch_size}",
                      what="sweep")
    tables = DropTables(plan.num_layers, num_windows(batches), plan.sublayers, plan.block_sizes)
    t0 = time.perf_counter()
    with evaluating(stack.model), torch.no_grad():
        for batch, record in schedule.drop_sweep(plan, journal):
            tables.put(batch.rows, record)
    result = tables.result(sum(objective.tokens(b) for b in batches), time.perf_counter() - t0)
    result.refused = dict(getattr(schedule, "refused", {}))
    return result


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
