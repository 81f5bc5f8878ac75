"""Batch-major schedule: the model's own forward, batch after batch.

Block hooks hand every block's input and output to the main pass's accumulator as the
forward runs (memory holds one batch's activations); the drop sweep stores one batch's block
inputs from one full pass and reruns the suffix of every drop from them (prefix caching).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from depthprobe.errors import MODEL_FORWARD_ERRORS, one_line, refused_by_model
from depthprobe.journal import Journal
from depthprobe.probes import metrics as M
from depthprobe.probes.accumulator import BaseLoss, GradOutput, PassAccumulator
from depthprobe.probes.batch import Batch
from depthprobe.probes.drop_tables import DropPlan, DropRecord, Variant
from depthprobe.probes.grad_norms import BlockGradNorms
from depthprobe.probes.hooks import watch_blocks, watch_mids, zero_output
from depthprobe.probes.objective import Objective
from depthprobe.probes.scoring import BatchScorer, capture_states


class BatchMajor:
    """Runs the main pass and the drop sweep over ``batches`` with the model's own forward."""

    order = "batch"

    def __init__(self, objective: Objective, batches: list[Batch], progress: bool = True):
        self.objective, self.batches, self.progress = objective, batches, progress
        self.stack = objective.stack
        #: blocks read state an earlier one left: each drop reruns the prefix, and one its forward refuses is NaN
        self.rerun_prefix = bool(self.stack.reads_earlier_state)
        self.refused: dict[Variant, str] = {}  # drops the model's forward refused -> why

    def _bar(self, total: int, desc: str, **kwargs):
        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False, delay=0.5, **kwargs)

    def main_pass(self, acc: PassAccumulator, losses: BaseLoss | None, grad: bool) -> GradOutput:
        """Feed ``acc`` from block hooks and ``losses`` from each batch's logits; with ``grad``
        the model's own backward, block gradient norms reduced as they are produced."""
        objective, last = self.objective, len(self.batches) - 1
        bar = self._bar(sum(b.size for b in self.batches), "analyze", unit="seq")
        with BlockGradNorms(self.stack).hooked() if grad else contextlib.nullcontext() as grad_norms, \
                watch_blocks(self.stack, acc.on_block), watch_mids(self.stack, acc.on_mid, acc.mid_layers):
            for index, batch in enumerate(self.batches):
                batch = objective.place(batch)
                acc.start_batch(batch)
                if grad_norms is not None and index == last:
                    grad_norms.last_batch()  # each gradient is final once this backward produces it
                with torch.set_grad_enabled(grad):
                    out = objective.forward(batch, head=losses is not None)
                    if losses is not None:
                        losses.add(objective.logits(out), batch, backward=grad)
                acc.end_batch(objective.reference(out))
                del out
                bar.update(batch.size)
            bar.close()
        if grad_norms is None:
            return GradOutput()
        return GradOutput(*grad_norms.columns())

    def drop_sweep(self, plan: DropPlan, journal: Journal) -> Iterator[tuple[Batch, DropRecord]]:
        """Every drop on each batch from one prefix pass; finished batches come from ``journal``."""
        steps = len(plan.variants)
        bar = self._bar(len(self.batches) * steps, "drop sweep")
        try:
            for batch in self.batches:
                done = journal.get(batch.index)
                if done is None:
                    record = self._sweep_batch(plan, self.objective.place(batch), bar)
                    journal.append(batch.index, record.to_json())
                else:
                    record = DropRecord.from_json(done)
                    bar.update(steps)
                yield batch, record
        finally:
            bar.close()

    def _sweep_batch(self, plan: DropPlan, batch: Batch, bar) -> DropRecord:
        """Every drop on one batch, from one prefix pass."""
        states, out = capture_states(self.objective, batch)
        scorer = BatchScorer(self.objective, batch, self.objective.reference(out))
        record = plan.record(batch.size)
        record.base = scorer.from_output(out).tolist()
        for v in plan.variants:
            try:
                record.set(v, self._score(scorer, v, states))
            except MODEL_FORWARD_ERRORS as exc:
                if not (self.rerun_prefix and refused_by_model(exc)):  # a model's other refusals: run_sweeps
                    raise
                self.refused.setdefault(v, one_line(exc))
                record.set(v, [float("nan")] * batch.size)
            if v.kind == "run":
                record.set_angle(v, M.angular_sum(states[v.layer], states[v.start]))
            bar.update()
        return record

    def _score(self, scorer: BatchScorer, v: Variant, states) -> list[float]:
        zeroed = (zero_output(self.stack.sublayer_output_module(v.layer, v.kind)) if v.kind in ("attn", "mlp")
                  else contextlib.nullcontext())
        with zeroed:
            if self.rerun_prefix:  # later blocks need what the prefix leaves
                keep = [i for i in range(len(self.stack)) if not v.layer <= i < v.start]
                return scorer.run(0, states[0], keep=keep).tolist()
            return scorer.run(v.start, states[v.layer]).tolist()
