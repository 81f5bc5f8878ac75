"""Layer-major schedule: every window passes block l before block l+1 runs.

Batch-major execution (the model's own forward, batch after batch) needs every block once
per batch; when accelerate offloads weights to disk or CPU it reads a block's weights at
each of those calls, so a drop sweep reads every block once per batch and per drop
variant. Layer-major execution turns the loops around: block l is made resident once
(:func:`~depthprobe.probes.offload.resident`), runs on every window's stream
(:class:`~depthprobe.probes.runner.BlockRunner`), and is released before block l+1, so each
block's weights are read **once per sweep**; results equal the batch-major run.

Streams of all windows (the full model's x_0..x_L for the main pass; for the drop sweep the
full model's stream plus one per drop variant) live in a
:class:`~depthprobe.probes.store.StateStore`, which spills to a memory-mapped temporary
file when it would not fit its memory budget. The drop sweep checkpoints its live streams
after every block (:class:`~depthprobe.probes.store.StreamCheckpoints`), so it resumes.

The helpers this module used to hold live in :mod:`~depthprobe.probes.runner`,
:mod:`~depthprobe.probes.store` and :mod:`~depthprobe.probes.offload`; their names stay
importable from here for one release.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import time
import warnings
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from depthprobe.journal import Journal
from depthprobe.model.stack import LayerStack
from depthprobe.probes import metrics as M
from depthprobe.probes.accumulator import BaseLoss, GradOutput, PassAccumulator
from depthprobe.probes.batch import Batch
from depthprobe.probes.drop_tables import DropPlan, DropRecord, Variant
from depthprobe.probes.grad_norms import BlockGradNorms
from depthprobe.probes.hooks import watch_mids, zero_output
from depthprobe.probes.objective import Objective
from depthprobe.probes.offload import (  # noqa: F401 - re-exported for one release
    is_offloaded,
    offload_hooks,
    outside_blocks,
    resident,
    return_freed_memory,
    use_layer_major,
)
from depthprobe.probes.runner import BlockRunner
from depthprobe.probes.scoring import BatchScorer
from depthprobe.probes.store import StateStore, StreamCheckpoints, default_state_budget, open_store
from depthprobe.probes.sweep import EXECUTION_ORDERS as ORDERS  # noqa: F401 - deprecated alias

__all__ = ["BlockRunner", "LayerMajor", "StateStore", "default_state_budget", "offload_hooks", "resident",
           "supports_block_backward", "use_layer_major"]


def supports_block_backward(stack: LayerStack) -> bool:
    """The block-by-block backward needs each parameter in one block only."""
    return not BlockGradNorms(stack).shared_across_blocks


class LayerMajor:
    """Runs the main pass and the drop sweep over ``batches`` block by block."""

    order = "layer"

    def __init__(self, objective: Objective, batches: list[Batch], progress: bool = True, *,
                 budget: int | None = None, spill_dir: str | os.PathLike | None = None):
        self.objective, self.batches, self.progress = objective, batches, progress
        self.stack, self.budget, self.spill_dir = objective.stack, budget, spill_dir
        self.runner = BlockRunner(objective)

    def _bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False, delay=0.5)

    def _store(self, count: int, fill: bool = True) -> StateStore:
        embed = lambda batch: self.runner.embed(self.objective.place(batch))  # noqa: E731
        return open_store(embed, self.batches, count, self.budget, self.spill_dir, fill)

    # ------------------------------------------------------------------ main pass
    def main_pass(self, acc: PassAccumulator, losses: BaseLoss | None, grad: bool) -> GradOutput:
        """All windows through block l (outputs stored), then the stored states x_0..x_L fed
        to ``acc`` batch by batch; with ``grad`` a backward block by block from the last."""
        num_layers = len(self.stack)
        bar = self._bar(num_layers * len(self.batches) * (2 if grad else 1), "analyze (layer-major)")
        # slots 0..L: x_0..x_L of every window; then the mid states m_l asked for; with grad one
        # more for dL/dx of the block being run back
        mids = {layer: num_layers + 1 + k for k, layer in enumerate(acc.mid_layers)}
        slots = num_layers + 1 + len(mids) + (1 if grad else 0)
        with resident(outside_blocks(self.stack, "prelude")), self._store(slots) as store:
            with torch.no_grad():
                for layer in range(num_layers):
                    with self.runner.at(layer), self._mid_into(store.data, mids, layer) as rows:
                        for batch in self.batches:
                            rows[0] = batch.rows
                            x = store.data[layer, batch.rows].to(self.objective.device)
                            store.data[layer + 1, batch.rows] = self.runner.run(self.objective.place(batch), x).cpu()
                            bar.update()
            with resident(outside_blocks(self.stack, "output")), torch.no_grad():  # final norm and head, read once
                self._feed(acc, losses, store.data, grad, mids)
            t_grad = time.perf_counter()
            out = GradOutput(*self._backward_by_block(store.data, bar)) if grad else GradOutput()
            out.seconds = time.perf_counter() - t_grad if grad else None
            bar.close()
        return out

    @contextlib.contextmanager
    def _mid_into(self, data: torch.Tensor, mids: dict[int, int], layer: int) -> Iterator[list]:
        """While block ``layer`` runs, its mid state goes to slot ``mids[layer]`` at the rows
        of the batch named in the yielded list's one item."""
        rows: list = [None]
        if layer not in mids:
            yield rows
            return

        def keep(_, mid: torch.Tensor) -> None:
            slot = data[mids[layer], rows[0]]  # a view of the store
            if mid.numel() == slot.numel():  # (OPT flattens the tokens before its MLP)
                slot.copy_(mid.detach().reshape(slot.shape))

        with watch_mids(self.stack, keep, [layer]):
            yield rows

    def _feed(self, acc: PassAccumulator, losses: BaseLoss | None, data: torch.Tensor, grad: bool,
              mids: dict[int, int] | None = None) -> None:
        """Feed the stored states x_0..x_L to ``acc`` batch by batch, as the batch-major pass
        does, and each batch's logits of x_L to ``losses``. With ``grad`` the same logits give
        dL/dx_L (L the mean loss over all predictions), written to the store's last slot."""
        objective, num_layers = self.objective, len(self.stack)
        for batch in self.batches:
            placed, win = objective.place(batch), batch.rows
            states = [data[i, win].to(objective.device) for i in range(num_layers + 1)]
            acc.start_batch(placed)
            for layer in range(num_layers):
                if mids and layer in mids:
                    acc.on_mid(layer, data[mids[layer], win].to(objective.device))
                acc.on_block(layer, states[layer], states[layer + 1])
            if losses is not None:
                last = states[-1].detach().requires_grad_(grad)
                with torch.set_grad_enabled(grad):
                    losses.add(self.stack.logits(last), placed, backward=grad)
                if grad:
                    data[-1, win] = last.grad.cpu()
            acc.end_batch(objective.stream_reference(states[-1]))

    def _backward_by_block(self, data: torch.Tensor, bar) -> tuple[dict[str, list[float]], dict[str, str]]:
        """Blocks L-1..0: re-run each on its stored inputs ``data[l]`` with autograd, backward from
        the upstream gradient in the last slot (replaced in place by dL/dx_l), reduce its
        parameters' gradients."""
        norms, device, upstream = BlockGradNorms(self.stack), self.objective.device, data[-1]
        for layer in reversed(range(len(self.stack))):
            with self.runner.at(layer):
                for batch in self.batches:
                    win = batch.rows
                    x = data[layer, win].to(device).requires_grad_(True)
                    with torch.enable_grad():
                        y = self.runner.run(self.objective.place(batch), x, graph=True)
                        y.backward(upstream[win].to(device=y.device, dtype=y.dtype))
                    upstream[win] = x.grad.cpu()
                    bar.update()
                norms.reduce_layer(layer)  # before accelerate takes the block's weights back
        return norms.columns()

    # ------------------------------------------------------------------ drop sweep
    def drop_sweep(self, plan: DropPlan, journal: Journal) -> Iterator[tuple[Batch, DropRecord]]:
        """Blocks in order. Entering block l, every variant that removes something starting at
        l takes a copy of the full model's stream x_l; then block l runs on the full stream and
        on every variant stream that has reached it (with the sublayer zeroed for that block's
        sublayer variants). After the last block every stream is scored, batch by batch. After
        each block the live streams are checkpointed (``journal``), so a killed sweep resumes."""
        variants, num_layers = plan.variants, plan.num_layers
        per_layer = [len(self.batches) * (1 + sum(v.start <= k for v in variants)) for k in range(num_layers)]
        bar = self._bar(sum(per_layer), "drop sweep (layer-major)")
        checkpoints = StreamCheckpoints(journal)
        try:
            with resident(outside_blocks(self.stack, "prelude")), self._store(1 + len(variants), fill=False) as store:
                first, angles = self._resume(checkpoints, store, bar, per_layer)
                for layer in range(first, num_layers):
                    self._advance(store.data, variants, layer, angles, bar)
                    live = [0] + [slot for slot, v in enumerate(variants, 1) if v.layer <= layer]
                    checkpoints.save(layer, store.data, live, {"angles": [[*k, v] for k, v in angles.items()]})
                with resident(outside_blocks(self.stack, "output")):  # final norm and head, read once
                    for index, batch in enumerate(self.batches):
                        yield batch, self._score(store.data, plan, batch, {k: s[index] for k, s in angles.items()})
        finally:
            bar.close()
        checkpoints.clear()

    def _resume(self, checkpoints: StreamCheckpoints, store: StateStore, bar,
                per_layer: list[int]) -> tuple[int, dict[tuple[int, int], list[float]]]:
        """The first block to run and the angle sums so far: after the newest checkpoint, or
        block 0 with x_0 of every window in slot 0."""
        found = checkpoints.latest(len(per_layer), store.data[0].numel() * store.data.element_size())
        if found is None:
            for batch in self.batches:
                store.data[0, batch.rows] = self.runner.embed(self.objective.place(batch)).cpu()
            return 0, {}
        layer, entry = found
        checkpoints.restore(store.data, layer, entry["slots"])
        bar.update(sum(per_layer[: layer + 1]))
        return layer + 1, {(size, first): sums for size, first, sums in entry["angles"]}

    def _advance(self, data: torch.Tensor, variants: list[Variant], layer: int, angles: dict, bar) -> None:
        """Run block ``layer`` on the full stream (slot 0) and every variant stream that reached it."""
        device = self.objective.device
        for slot, v in enumerate(variants, 1):
            if v.layer == layer:  # the variant starts from the full model's x_layer
                data[slot].copy_(data[0])
        live = [(slot, v) for slot, v in enumerate(variants, 1) if v.start <= layer]
        with self.runner.at(layer):
            for batch in self.batches:
                placed, win = self.objective.place(batch), batch.rows
                for slot, v in live:
                    if v.kind == "run" and v.start == layer:  # x_first (unchanged so far) against x_{first+n}
                        angles.setdefault((v.size, v.layer), []).append(M.angular_sum(data[slot, win], data[0, win]))
                    zeroed = v.kind in ("attn", "mlp") and v.layer == layer
                    module = self.stack.sublayer_output_module(layer, v.kind) if zeroed else None
                    with zero_output(module) if zeroed else contextlib.nullcontext():
                        data[slot, win] = self.runner.run(placed, data[slot, win].to(device)).cpu()
                    bar.update()
                data[0, win] = self.runner.run(placed, data[0, win].to(device)).cpu()
                bar.update()

    def _score(self, data: torch.Tensor, plan: DropPlan, batch: Batch, angles: dict) -> DropRecord:
        """One batch's record from the final streams (``angles``: this batch's sums)."""
        objective, device, win = self.objective, self.objective.device, batch.rows
        placed = objective.place(batch)
        final = data[0, win].to(device)
        scorer = BatchScorer(objective, placed, objective.stream_reference(final))
        record = plan.record(batch.size)
        record.base = scorer.from_stream(final).tolist()
        for slot, v in enumerate(plan.variants, 1):
            record.set(v, scorer.from_stream(data[slot, win].to(device)).tolist())
            if v.kind == "run":
                record.set_angle(v, angles[(v.size, v.layer)] if v.start < plan.num_layers
                                 else M.angular_sum(data[slot, win], data[0, win]))
        return record


#: names that moved: ``layer_major.<name>`` -> ``<module>.<name>`` (warns, for one release)
_MOVED = {"run_main_pass_layer_major": "depthprobe.probes.main_pass",
          "run_drop_sweep_layer_major": "depthprobe.probes.drop"}


def __getattr__(name: str):
    if name in _MOVED:
        warnings.warn(f"depthprobe.probes.layer_major.{name} moved to {_MOVED[name]}.{name} (deprecated: pass "
                      "execution=ExecutionOptions(order='layer')); this alias goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'depthprobe.probes.layer_major' has no attribute {name!r}")
