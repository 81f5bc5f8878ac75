"""The main pass: one forward (+ one backward for ``grad``) over all windows, streaming.

Block hooks hand every block's input and output to a :class:`PassAccumulator`, which turns
them into running sums and drops the activations, so memory does not grow with the number
of windows. The accumulator does not know how the states were produced: this module drives
it batch-major with the model's own forward, and a layer-major or offloaded pass can drive
the same object (``start_batch``, ``on_block`` for each block in order, ``end_batch``) and
read the same :meth:`~PassAccumulator.columns`.

The pass computes only what the requested metrics need: ``angular`` and ``variance`` read
the stream through the model without its LM head; the full model (and the base loss) runs
when ``loss`` is asked, which :func:`needs_loss` decides from the metrics.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from depthprobe import distributed
from depthprobe.config import DEFAULT_METRICS, PASS_METRICS  # noqa: F401  (re-exported; defined in config)
from depthprobe.data import Windows
from depthprobe.model.stack import LayerStack, lm_logits
from depthprobe.probes import metrics as M
from depthprobe.probes.grad_norms import BlockGradNorms
from depthprobe.probes.hooks import only_blocks_require_grad, watch_blocks
from depthprobe.probes.objective import Objective
from depthprobe.probes.router import watch_routers

#: metrics that read only the residual stream: a run of these alone never needs the LM head
STREAM_METRICS = ("angular", "variance")


def needs_loss(metrics: Collection[str]) -> bool:
    """Whether the base loss is worth computing: any metric other than the stream-only ones
    scores the model by its objective (and the report compares it with the base loss)."""
    return any(m not in STREAM_METRICS for m in metrics)


class _Angular:
    """Sums of arccos and cos between every pair of states x_0..x_L (float64)."""

    def __init__(self, num_layers: int):
        n_states = num_layers + 1
        self.units: list[torch.Tensor | None] = [None] * n_states
        self.ang = torch.zeros(n_states, n_states, dtype=torch.float64)
        self.cos = torch.zeros(n_states, n_states, dtype=torch.float64)

    def on_block(self, layer: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        if layer == 0:
            self.units[0] = M.unit(x_in)
        self.units[layer + 1] = M.unit(x_out)

    def end_batch(self) -> None:
        a, c = M.angular_gram_sums(self.units)
        self.ang += a
        self.cos += c
        self.units = [None] * len(self.units)

    def matrix(self, tokens: int) -> list[list[float]]:
        return (self.ang / tokens).tolist()

    def columns(self, tokens: int) -> dict[str, list[float]]:
        ang, cos = (self.ang / tokens).tolist(), (self.cos / tokens).tolist()
        n = len(ang) - 1
        return {"angular_distance": [ang[i][i + 1] for i in range(n)],
                "block_influence": [1 - cos[i][i + 1] for i in range(n)]}


class _Scale:
    """Sums of per-token variance and RMS of every block output, and the running max |x|."""

    def __init__(self, num_layers: int):
        self.var, self.rms = np.zeros(num_layers), np.zeros(num_layers)
        self.max_abs = np.full(num_layers, -np.inf)

    def on_block(self, layer: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        self.var[layer] += M.variance_sum(x_out)
        self.rms[layer] += M.rms_sum(x_out)
        self.max_abs[layer] = max(self.max_abs[layer], M.max_abs(x_out))

    def columns(self, tokens: int) -> dict[str, list[float]]:
        return {"activation_variance": list(self.var / tokens), "activation_rms": list(self.rms / tokens),
                "max_abs_activation": list(self.max_abs)}


class _Lens:
    """Objective with each block output taken as the last: summed now (LM) or when the batch's
    final state is known (encoders)."""

    def __init__(self, objective: Objective, num_layers: int):
        self.objective = objective
        self.sums = np.zeros(num_layers)
        self.pending: dict[int, torch.Tensor] = {}

    def on_block(self, layer: int, x_out: torch.Tensor, input_ids: torch.Tensor) -> None:
        if self.objective.lm:
            self.sums[layer] += self.objective.stream_sum(x_out.detach(), input_ids, None)
        else:
            self.pending[layer] = x_out.detach()

    def end_batch(self, input_ids: torch.Tensor, reference: torch.Tensor | None) -> None:
        for layer, hidden in self.pending.items():
            self.sums[layer] += self.objective.stream_sum(hidden, input_ids, reference)
        self.pending = {}

    def columns(self, count: int) -> dict[str, list[float]]:
        return {"logit_lens_loss": list(self.sums / count)}


class PassAccumulator:
    """Running per-layer sums of the main-pass metrics, fed block by block.

    Drive it with ``start_batch(ids)``, ``on_block(l, x_l, x_{l+1})`` for every block,
    ``end_batch(reference)`` (encoders: the batch's final hidden state); then ``columns()``.
    """

    def __init__(self, objective: Objective, metrics: Collection[str]):
        num_layers = len(objective.stack)
        self.objective = objective
        self.angular = _Angular(num_layers) if "angular" in metrics else None
        self.scale = _Scale(num_layers) if "variance" in metrics else None
        self.lens = _Lens(objective, num_layers) if "lens" in metrics else None
        self.seconds = {name: 0.0 for name in ("angular", "variance", "lens")}
        self.tokens = 0  # hidden-state tokens
        self.predictions = 0  # next-token predictions
        self.input_ids: torch.Tensor | None = None

    def start_batch(self, input_ids: torch.Tensor) -> None:
        self.input_ids = input_ids

    def on_block(self, layer: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        with torch.no_grad():
            if self.angular is not None:
                with self._timed("angular"):
                    self.angular.on_block(layer, x_in, x_out)
            if self.scale is not None:
                with self._timed("variance"):
                    self.scale.on_block(layer, x_in, x_out)
            if self.lens is not None:
                with self._timed("lens"):
                    self.lens.on_block(layer, x_out, self.input_ids)

    @contextlib.contextmanager
    def _timed(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[name] += time.perf_counter() - t0

    def end_batch(self, reference: torch.Tensor | None = None) -> None:
        with torch.no_grad():
            if self.angular is not None:
                with self._timed("angular"):
                    self.angular.end_batch()
            if self.lens is not None:
                with self._timed("lens"):
                    self.lens.end_batch(self.input_ids, reference)
        self.tokens += self.input_ids.numel()
        self.predictions += self.input_ids.shape[0] * (self.input_ids.shape[1] - 1)

    def columns(self) -> dict[str, list[float]]:
        columns: dict[str, list[float]] = {}
        if self.angular is not None:
            columns.update(self.angular.columns(self.tokens))
        if self.scale is not None:
            columns.update(self.scale.columns(self.tokens))
        if self.lens is not None:
            columns.update(self.lens.columns(self.predictions if self.objective.lm else self.tokens))
        return columns

    def reduce(self) -> None:
        """Sum (and max) the running statistics over torchrun processes (:mod:`depthprobe.distributed`)."""
        if self.angular is not None:
            self.angular.ang, self.angular.cos = distributed.reduce_sum(self.angular.ang), \
                distributed.reduce_sum(self.angular.cos)
        if self.scale is not None:
            self.scale.var, self.scale.rms = distributed.reduce_sum(self.scale.var), distributed.reduce_sum(self.scale.rms)
            self.scale.max_abs = distributed.reduce_max(self.scale.max_abs)
        if self.lens is not None:
            self.lens.sums = distributed.reduce_sum(self.lens.sums)
        self.tokens, self.predictions = (int(distributed.reduce_sum(self.tokens)),
                                         int(distributed.reduce_sum(self.predictions)))

    def angular_matrix(self) -> list[list[float]] | None:
        """The square ``(L+1, L+1)`` mean angular distance matrix, when angular was measured."""
        return self.angular.matrix(self.tokens) if self.angular is not None else None


@dataclass
class PassResult:
    columns: dict[str, list[float]]
    timings: dict[str, float]
    base_loss: float | None
    window_nll: np.ndarray | None  # (N,) mean-token loss of each window (LMs, when the loss ran)
    angular_matrix: list[list[float]] | None
    not_applicable: dict[str, str] = field(default_factory=dict)  # column -> why it is left empty


#: the main pass's columns in ``layers.csv``, in this order whichever way the pass ran
COLUMN_ORDER = ("angular_distance", "block_influence", "activation_variance", "activation_rms", "max_abs_activation",
                "grad_norm", "grad_norm_attn", "grad_norm_mlp", "logit_lens_loss", "router_load_entropy")


def ordered_columns(columns: dict[str, list[float]]) -> dict[str, list[float]]:
    return {k: columns[k] for k in COLUMN_ORDER if k in columns}


class _Loss:
    """Base loss over the pass; its backward (for ``grad``) uses the mean over all predictions."""

    def __init__(self, objective: Objective, total_predictions: int):
        self.objective, self.total = objective, total_predictions
        self.nll_sum = 0.0
        self.windows: list[float] = []

    def add(self, out, input_ids: torch.Tensor, backward: bool) -> None:
        nll, _ = self.objective.loss_sum(out, input_ids)
        self.nll_sum += float(nll.detach())
        with torch.no_grad():
            self.windows.extend(M.per_sequence_nll(lm_logits(out).detach(), input_ids).tolist())
        if backward:
            (nll / self.total).backward()

    def reduce(self) -> None:
        """Sum over torchrun processes; window losses gathered in window order."""
        self.nll_sum = distributed.reduce_sum(self.nll_sum)
        self.windows = distributed.gather(self.windows).tolist() if distributed.active() else self.windows


def run_main_pass(stack: LayerStack, windows: Windows, metrics: Collection[str], *, batch_size: int,
                  loss: bool, progress: bool = True) -> PassResult:
    """Drive a :class:`PassAccumulator` over all windows with the model's own forward."""
    objective = Objective(stack)
    acc = PassAccumulator(objective, metrics)
    grad = "grad" in metrics and objective.lm
    full = objective.lm and (loss or grad)  # logits only when a loss is needed
    # the mean over all processes' predictions (torchrun): their gradients are summed
    losses = _Loss(objective, distributed.total_windows(windows.num_sequences) * (windows.seq_len - 1)) if full else None
    t_pass = time.perf_counter()
    bar = tqdm(total=windows.num_sequences, desc="analyze", unit="seq", disable=not progress, leave=False, delay=0.5)
    routers = watch_routers(stack)
    n_batches = math.ceil(windows.num_sequences / batch_size)
    with only_blocks_require_grad(stack) if grad else contextlib.nullcontext(), \
            BlockGradNorms(stack).hooked() if grad else contextlib.nullcontext() as grad_norms, \
            watch_blocks(stack, acc.on_block), routers:
        for index, batch in enumerate(windows.batches(batch_size)):
            ids = batch.to(objective.device)
            acc.start_batch(ids)
            if grad_norms is not None and index == n_batches - 1:
                grad_norms.last_batch()  # each gradient is final once this backward produces it
            with torch.set_grad_enabled(grad):
                out = objective.forward(ids, head=full)
                if losses is not None:
                    losses.add(out, ids, backward=grad)
            acc.end_batch(objective.reference(out))
            del out
            bar.update(batch.shape[0])
        bar.close()
    grad_columns, not_applicable = grad_norms.columns() if grad_norms is not None else ({}, {})
    acc.reduce()  # torchrun: sums over all processes' windows (gradients: in BlockGradNorms)
    routers.reduce()
    if losses is not None:
        losses.reduce()
    seconds = time.perf_counter() - t_pass
    timings = {"pass": seconds, **{k: v for k, v in acc.seconds.items() if k in metrics}}
    if grad:
        timings["grad"] = seconds - sum(acc.seconds.values())
    columns = ordered_columns({**acc.columns(), **grad_columns, **routers.columns()})
    base_loss = losses.nll_sum / losses.total if losses is not None else None
    window_nll = np.asarray(losses.windows) if losses is not None else None
    return PassResult(columns, timings, base_loss, window_nll, acc.angular_matrix(), not_applicable)
