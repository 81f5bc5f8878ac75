"""Running per-layer sums of the main-pass metrics and the base loss, fed block by block.

The accumulator does not know how the states were produced: the batch-major schedule feeds
it from block hooks during the model's own forward, the layer-major one from stored states
(``start_batch``, ``on_block`` for each block in order, ``end_batch``); both read the same
:meth:`PassAccumulator.columns`. Memory does not grow with the number of windows.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
import torch

from depthprobe import distributed
from depthprobe.probes import metrics as M
from depthprobe.probes.batch import Batch, as_batch
from depthprobe.probes.objective import Objective

#: the main pass's columns in ``layers.csv``, in this order whichever way the pass ran
COLUMN_ORDER = ("angular_distance", "block_influence", "activation_variance", "activation_rms", "max_abs_activation",
                "grad_norm", "grad_norm_attn", "grad_norm_mlp", "logit_lens_loss", "router_load_entropy")
#: the same measured at each block's mid state (``blocks.{l}.resid_mid``), after the main ones
MID_COLUMNS = ("angular_distance_mid", "block_influence_mid", "activation_variance_mid", "activation_rms_mid",
               "max_abs_activation_mid", "logit_lens_loss_mid")


def ordered_columns(columns: dict[str, list[float]]) -> dict[str, list[float]]:
    return {k: columns[k] for k in (*COLUMN_ORDER, *MID_COLUMNS) if k in columns}


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

    def reduce(self) -> None:
        self.ang, self.cos = distributed.reduce_sum(self.ang), distributed.reduce_sum(self.cos)


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

    def reduce(self) -> None:
        self.var, self.rms = distributed.reduce_sum(self.var), distributed.reduce_sum(self.rms)
        self.max_abs = distributed.reduce_max(self.max_abs)


class _Lens:
    """Objective with each block output taken as the last: summed now (LM) or when the batch's
    final state is known (encoders)."""

    def __init__(self, objective: Objective, num_layers: int):
        self.objective = objective
        self.sums = np.zeros(num_layers)
        self.pending: dict[int, torch.Tensor] = {}

    def on_block(self, layer: int, x_out: torch.Tensor, batch: Batch) -> None:
        if self.objective.lm:
            self.sums[layer] += self.objective.stream_sum(x_out.detach(), batch, None)
        else:
            self.pending[layer] = x_out.detach()

    def end_batch(self, batch: Batch, reference: torch.Tensor | None) -> None:
        for layer, hidden in self.pending.items():
            self.sums[layer] += self.objective.stream_sum(hidden, batch, reference)
        self.pending = {}

    def columns(self, count: int) -> dict[str, list[float]]:
        return {"logit_lens_loss": list(self.sums / count)}

    def reduce(self) -> None:
        self.sums = distributed.reduce_sum(self.sums)


class _Mid:
    """The same sums at each block's mid state m_l (after the attention sublayer): angle and
    influence of x_l -> m_l, scale of m_l, objective with m_l taken as the last block's output.
    Blocks without a mid state stay NaN (not applicable)."""

    def __init__(self, objective: Objective, metrics: Collection[str], layers: Collection[int]):
        num_layers = len(objective.stack)
        self.objective, self.metrics = objective, set(metrics)
        self.applies = np.array([i in set(layers) for i in range(num_layers)])
        self.ang, self.cos, self.var, self.rms = (np.zeros(num_layers) for _ in range(4))
        self.max_abs = np.full(num_layers, -np.inf)
        self.lens = _Lens(objective, num_layers)  # m_l in place of x_{l+1}

    def on_mid(self, layer: int, x_in: torch.Tensor, mid: torch.Tensor, batch: Batch) -> None:
        if mid.numel() != x_in.numel():  # not the stream after all (the probe forward said it was): leave it out
            self.applies[layer] = False
            return
        mid = mid.reshape(x_in.shape)  # some blocks flatten the tokens before the MLP (OPT)
        if "angular" in self.metrics:
            self.ang[layer] += M.angular_sum(x_in, mid)
            self.cos[layer] += M.cosine_sum(x_in, mid)
        if "variance" in self.metrics:
            self.var[layer] += M.variance_sum(mid)
            self.rms[layer] += M.rms_sum(mid)
            self.max_abs[layer] = max(self.max_abs[layer], M.max_abs(mid))
        if "lens" in self.metrics:
            self.lens.on_block(layer, mid, batch)

    def end_batch(self, batch: Batch, reference: torch.Tensor | None) -> None:
        self.lens.end_batch(batch, reference)

    def columns(self, tokens: int, lens_count: int) -> dict[str, list[float]]:
        def masked(values) -> list[float]:
            return list(np.where(self.applies, values, np.nan))

        out = {}
        if "angular" in self.metrics:
            out |= {"angular_distance_mid": masked(self.ang / tokens), "block_influence_mid": masked(1 - self.cos / tokens)}
        if "variance" in self.metrics:
            out |= {"activation_variance_mid": masked(self.var / tokens), "activation_rms_mid": masked(self.rms / tokens),
                    "max_abs_activation_mid": masked(self.max_abs)}
        if "lens" in self.metrics:
            out["logit_lens_loss_mid"] = masked(self.lens.sums / lens_count)
        return out

    def reduce(self) -> None:
        self.ang, self.cos, self.var, self.rms = (
            distributed.reduce_sum(v) for v in (self.ang, self.cos, self.var, self.rms))
        self.max_abs = distributed.reduce_max(self.max_abs)
        self.lens.reduce()


class PassAccumulator:
    """Running per-layer sums of the main-pass metrics, fed block by block.

    Drive it with ``start_batch(batch)``, ``on_block(l, x_l, x_{l+1})`` for every block,
    ``end_batch(reference)`` (encoders: the batch's final hidden state); then ``columns()``.
    With ``mid_layers`` (blocks that have a mid state) ``on_mid(l, m_l)`` before block l's
    ``on_block`` adds the ``*_mid`` columns.
    """

    def __init__(self, objective: Objective, metrics: Collection[str], mid_layers: Collection[int] | None = None):
        num_layers = len(objective.stack)
        self.objective = objective
        wants_mid = mid_layers is not None and any(m in metrics for m in ("angular", "variance", "lens"))
        self.mid = _Mid(objective, metrics, mid_layers) if wants_mid else None
        self._mids: dict[int, torch.Tensor] = {}
        #: blocks whose mid state the schedule should hand to :meth:`on_mid` (none: no ``*_mid`` columns)
        self.mid_layers: list[int] = sorted(mid_layers) if self.mid is not None else []
        self.angular = _Angular(num_layers) if "angular" in metrics else None
        self.scale = _Scale(num_layers) if "variance" in metrics else None
        self.lens = _Lens(objective, num_layers) if "lens" in metrics else None
        self.seconds = {name: 0.0 for name in ("angular", "variance", "lens", "mid")}
        self.tokens = 0  # hidden-state tokens
        self.predictions = 0  # scored predictions (next-token: B (T-1) per batch)
        self.batch: Batch | None = None
        self._batch_tokens = 0

    def start_batch(self, batch: Batch | torch.Tensor) -> None:
        """The batch whose blocks come next (token ids are taken as one token batch)."""
        self.batch = as_batch(batch)

    def on_mid(self, layer: int, mid: torch.Tensor) -> None:
        """Block ``layer``'s mid state m_l (its ``on_block`` comes next)."""
        if self.mid is not None:
            self._mids[layer] = mid

    def on_block(self, layer: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        if layer == 0:
            self._batch_tokens = math.prod(x_in.shape[:-1])
        with torch.no_grad():
            mid = self._mids.pop(layer, None)
            if mid is not None:
                with self._timed("mid"):
                    self.mid.on_mid(layer, x_in, mid, self.batch)
            if self.angular is not None:
                with self._timed("angular"):
                    self.angular.on_block(layer, x_in, x_out)
            if self.scale is not None:
                with self._timed("variance"):
                    self.scale.on_block(layer, x_in, x_out)
            if self.lens is not None:
                with self._timed("lens"):
                    self.lens.on_block(layer, x_out, self.batch)

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
                    self.lens.end_batch(self.batch, reference)
            if self.mid is not None:
                with self._timed("mid"):
                    self.mid.end_batch(self.batch, reference)
        self.tokens += self._batch_tokens
        self.predictions += self.objective.predictions(self.batch)

    def columns(self) -> dict[str, list[float]]:
        columns: dict[str, list[float]] = {}
        if self.angular is not None:
            columns.update(self.angular.columns(self.tokens))
        if self.scale is not None:
            columns.update(self.scale.columns(self.tokens))
        if self.lens is not None:
            columns.update(self.lens.columns(self.predictions if self.objective.lm else self.tokens))
        if self.mid is not None:
            columns.update(self.mid.columns(self.tokens, self.predictions if self.objective.lm else self.tokens))
        return columns

    def reduce(self) -> None:
        """Sum (and max) the running statistics over torchrun processes (:mod:`depthprobe.distributed`)."""
        for part in (self.angular, self.scale, self.lens, self.mid):
            if part is not None:
                part.reduce()
        self.tokens, self.predictions = (int(distributed.reduce_sum(self.tokens)),
                                         int(distributed.reduce_sum(self.predictions)))

    def angular_matrix(self) -> list[list[float]] | None:
        """The square ``(L+1, L+1)`` mean angular distance matrix, when angular was measured."""
        return self.angular.matrix(self.tokens) if self.angular is not None else None


class BaseLoss:
    """The base loss over the pass, from each batch's logits (:meth:`Objective.loss_terms`);
    its backward (for ``grad``) uses the mean over all ``total`` predictions of all processes."""

    def __init__(self, objective: Objective, total: int):
        self.objective, self.total = objective, total
        self.nll_sum = 0.0
        self.windows: list[float] = []

    def add(self, logits: torch.Tensor, batch: Batch, backward: bool) -> None:
        nll, windows = self.objective.loss_terms(logits, batch)
        if backward:
            (nll / self.total).backward()
        self.nll_sum += float(nll.detach())
        self.windows.extend(windows.tolist())

    def reduce(self) -> None:
        """Sum over torchrun processes; window losses gathered in window order."""
        self.nll_sum = distributed.reduce_sum(self.nll_sum)
        self.windows = distributed.gather(self.windows).tolist() if distributed.active() else self.windows

    @property
    def mean(self) -> float:
        return self.nll_sum / self.total

    def window_array(self) -> np.ndarray:
        return np.asarray(self.windows, float)


@dataclass
class GradOutput:
    """What a schedule's pass returns besides what it fed: the gradient columns (``grad``),
    why some are empty, and the backward's seconds when the schedule timed it apart."""

    columns: dict[str, list[float]] = field(default_factory=dict)
    not_applicable: dict[str, str] = field(default_factory=dict)
    seconds: float | None = None
