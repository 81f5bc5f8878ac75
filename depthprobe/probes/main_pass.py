"""The main pass: one forward (+ one backward for ``grad``) over all windows, streaming.

Written once against a schedule (:mod:`~depthprobe.probes.batch_major`: the model's own
forward, batch after batch; :mod:`~depthprobe.probes.layer_major`: every window through
block l before block l+1, each offloaded block's weights read once) that hands every
block's input and output to a :class:`~depthprobe.probes.accumulator.PassAccumulator` and
every batch's logits to one :class:`~depthprobe.probes.accumulator.BaseLoss`.

The pass computes only what the requested metrics need: ``angular`` and ``variance`` read
the stream through the model without its LM head; the full model (and the base loss) runs
when ``loss`` is asked, which :func:`needs_loss` decides from the metrics.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np

from depthprobe import distributed
from depthprobe.config import DEFAULT_METRICS, PASS_METRICS  # noqa: F401  (re-exported; defined in config)
from depthprobe.data import Windows
from depthprobe.model.mid import mid_modules
from depthprobe.model.stack import LayerStack
from depthprobe.probes.accumulator import COLUMN_ORDER, BaseLoss, PassAccumulator, ordered_columns
from depthprobe.probes.batch import batches_of
from depthprobe.probes.hooks import only_blocks_require_grad
from depthprobe.probes.objective import objective_for
from depthprobe.probes.offload import use_layer_major
from depthprobe.probes.router import watch_routers
from depthprobe.probes.schedules import make_schedule
from depthprobe.probes.sweep import ExecutionOptions

#: metrics that read only the residual stream: a run of these alone never needs the LM head
STREAM_METRICS = ("angular", "variance")
#: metrics that also read each block's mid state (``*_mid`` columns)
MID_METRICS = ("angular", "variance", "lens")

__all__ = ["COLUMN_ORDER", "DEFAULT_METRICS", "PASS_METRICS", "STREAM_METRICS", "PassAccumulator", "PassResult",
           "needs_loss", "ordered_columns", "run_main_pass", "run_main_pass_layer_major"]


def needs_loss(metrics: Collection[str]) -> bool:
    """Whether the base loss is worth computing: any metric other than the stream-only ones
    scores the model by its objective (and the report compares it with the base loss)."""
    return any(m not in STREAM_METRICS for m in metrics)


@dataclass
class PassResult:
    columns: dict[str, list[float]]
    timings: dict[str, float]
    base_loss: float | None
    window_nll: np.ndarray | None  # (N,) mean-token loss of each window (LMs, when the loss ran)
    angular_matrix: list[list[float]] | None
    not_applicable: dict[str, str] = field(default_factory=dict)  # column -> why it is left empty


def run_main_pass(stack: LayerStack, windows: Windows, metrics: Collection[str], *, batch_size: int,
                  loss: bool, progress: bool = True, execution: ExecutionOptions | None = None) -> PassResult:
    """Angular, variance, lens, grad, base loss and router load over all windows.

    ``execution``: batch-major by default; ``order="layer"`` (or ``"auto"`` on offloaded
    weights) runs it layer-major, streams in a store of ``state_budget`` bytes spilled under
    ``spill_dir``: the numbers are the same.
    """
    execution = execution or ExecutionOptions(order="batch")
    order = "layer" if use_layer_major(execution.order, stack.model) else "batch"
    objective = objective_for(stack)
    batches = batches_of(windows, batch_size)
    schedule = make_schedule(order, objective, batches, progress, execution.state_budget, execution.spill_dir)
    # the mid states (after attention) where the block's structure shows one
    mid = mid_modules(stack) if any(m in MID_METRICS for m in metrics) else None
    acc = PassAccumulator(objective, metrics, None if mid is None else list(mid))
    grad = "grad" in metrics and objective.lm
    full = objective.lm and (loss or grad)  # logits only when a loss is needed
    # the mean over all processes' predictions (torchrun): their gradients are summed
    total = int(distributed.reduce_sum(sum(objective.predictions(b) for b in batches))) if full else 0
    losses = BaseLoss(objective, total) if full else None
    t_pass = time.perf_counter()
    with only_blocks_require_grad(stack) if grad else contextlib.nullcontext(), watch_routers(stack) as routers:
        out = schedule.main_pass(acc, losses, grad)
        acc.reduce()  # torchrun: sums over all processes' windows (gradients: in BlockGradNorms)
        routers.reduce()
        if losses is not None:
            losses.reduce()
        columns = ordered_columns({**acc.columns(), **out.columns, **routers.columns()})
    seconds = time.perf_counter() - t_pass
    timings = {"pass": seconds, **{k: v for k, v in acc.seconds.items() if k in metrics}}
    if grad:
        timings["grad"] = out.seconds if out.seconds is not None else seconds - sum(acc.seconds.values())
    if losses is None:
        return PassResult(columns, timings, None, None, acc.angular_matrix(), out.not_applicable)
    return PassResult(columns, timings, losses.mean, losses.window_array(), acc.angular_matrix(), out.not_applicable)


def run_main_pass_layer_major(stack: LayerStack, windows: Windows, metrics: Collection[str], *, batch_size: int,
                              loss: bool, progress: bool = True, budget: int | None = None,
                              spill_dir: str | os.PathLike | None = None) -> PassResult:
    """Deprecated (one release): ``run_main_pass(..., execution=ExecutionOptions("layer", budget, spill_dir))``."""
    execution = ExecutionOptions(order="layer", state_budget=budget,
                                 spill_dir=None if spill_dir is None else str(spill_dir))
    return run_main_pass(stack, windows, metrics, batch_size=batch_size, loss=loss, progress=progress,
                         execution=execution)
