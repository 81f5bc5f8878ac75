"""The objective every measurement scores a model by: the one place that knows the model's
forward, where its inputs go, and the score.

A causal LM is scored by its mean-token next-token loss (``lm_loss``). An encoder has no
next-token objective, so it is scored by the cosine drift of its final hidden state against
the full model's (``cosine_drift``: mean over tokens of 1 - cos(h_t, h_t^ref), so the full
model scores 0). The main pass, the drop sweep, attribution, pruning and the held-out loss
all score through :class:`Objective`, so the definitions cannot drift apart.

The engine hands the objective :class:`~depthprobe.probes.batch.Batch` objects (the model's
input dict plus targets) and never looks inside them: another kind of model (an image
classifier: ``pixel_values`` in, labels as targets) is another :class:`Objective` subclass,
registered with :func:`register_objective`, not a change to the passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from depthprobe.model.stack import LayerStack, lm_logits
from depthprobe.probes import metrics as M
from depthprobe.probes.batch import Batch

LM_LOSS = "lm_loss"
COSINE_DRIFT = "cosine_drift"


def input_device(stack: LayerStack) -> torch.device:
    """Where a model's inputs go: the device its embedding runs on.

    Under a ``device_map`` the blocks (``stack.device``) may sit elsewhere (accelerate moves
    each block's inputs itself), and an offloaded embedding's weights live on ``meta`` or the
    CPU while it *runs* on its hook's execution device: that device, else its weights'.
    """
    hook = getattr(stack.embed, "_hf_hook", None)
    for part in getattr(hook, "hooks", [hook] if hook is not None else []):
        device = getattr(part, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return stack.input_device


def stream_model(stack: LayerStack) -> torch.nn.Module:
    """The model without its LM head (``model.base_model``) when the blocks live inside it:
    running it reads the same residual stream without paying for the vocabulary projection."""
    base = getattr(stack.model, "base_model", None)
    if isinstance(base, torch.nn.Module) and base is not stack.model:
        if any(module is stack.blocks for module in base.modules()):
            return base
    return stack.model


@dataclass
class Objective:
    """LM loss for causal LMs, cosine drift of the final hidden state for encoders.

    ``reference`` arguments are the full model's final hidden state ``(B, T, d)`` for
    encoders (from :meth:`reference`) and ``None`` for LMs. ``batch`` arguments are
    :class:`~depthprobe.probes.batch.Batch` objects already on :attr:`device`.
    """

    stack: LayerStack

    @property
    def lm(self) -> bool:
        return self.stack.is_causal_lm

    @property
    def name(self) -> str:
        return LM_LOSS if self.lm else COSINE_DRIFT

    @property
    def device(self) -> torch.device:
        """Where batches go (:func:`input_device`)."""
        return input_device(self.stack)

    def place(self, batch: Batch) -> Batch:
        """``batch`` on the input device: the one input-placement rule."""
        return batch.to(self.device)

    def forward(self, batch: Batch, head: bool = True):
        """The model's own forward; ``head=False`` stops at the final hidden state (no logits)."""
        model = self.stack.model if head else stream_model(self.stack)
        if self.lm:
            return model(**batch.inputs, use_cache=False)
        return model(**batch.inputs)

    def reference(self, out) -> torch.Tensor | None:
        """What drift is measured against: the full model's final hidden state (encoders)."""
        return None if self.lm else out.last_hidden_state.detach()

    def stream_reference(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """:meth:`reference` from the last block's output instead of the model's output."""
        return None if self.lm else self.stack.final_hidden(hidden)

    def tokens(self, batch: Batch) -> int:
        """Residual-stream positions in ``batch`` (``B T``)."""
        return batch.input_ids.numel()

    def predictions(self, batch: Batch) -> int:
        """Scored predictions in ``batch`` (next-token: ``B (T-1)``)."""
        ids = batch.targets
        return ids.shape[0] * (ids.shape[1] - 1)

    def logits(self, out) -> torch.Tensor:
        return lm_logits(out)

    def loss_terms(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The base loss of one batch from its logits: the summed next-token NLL (graph kept,
        for ``backward``) and each window's mean NLL ``(B,)`` float64 (detached)."""
        nll, _ = M.next_token_nll_sum(logits, batch.targets)
        return nll, M.per_sequence_nll(logits.detach(), batch.targets)

    def loss_sum(self, out, batch: Batch) -> tuple[torch.Tensor, int]:
        """Summed next-token NLL of a full forward (graph kept, for ``backward``) and its count."""
        return M.next_token_nll_sum(lm_logits(out), batch.targets)

    def window_scores(self, out, batch: Batch, reference: torch.Tensor | None) -> np.ndarray:
        """Objective of each window from a forward's output, ``(B,)``."""
        if self.lm:
            return M.per_sequence_nll(lm_logits(out), batch.targets).cpu().numpy()
        return M.per_sequence_drift(out.last_hidden_state, reference).cpu().numpy()

    def stream_scores(self, hidden: torch.Tensor, batch: Batch, reference: torch.Tensor | None) -> np.ndarray:
        """Objective of each window if ``hidden`` were the last block's output, ``(B,)``."""
        if self.lm:
            return M.per_sequence_nll(self.stack.logits(hidden, batch.input_ids), batch.targets).cpu().numpy()
        return M.per_sequence_drift(self.stack.final_hidden(hidden), reference).cpu().numpy()

    def stream_sum(self, hidden: torch.Tensor, batch: Batch, reference: torch.Tensor | None) -> float:
        """Summed objective (over predictions, or tokens for drift) with ``hidden`` as the last
        block's output: the logit lens."""
        if self.lm and self.stack.positionwise_head:  # the last position predicts nothing: no head for it
            return float(M.shifted_nll_sum(self.stack.logits(hidden[:, :-1]), batch.targets[:, 1:]))
        if self.lm:
            return float(M.next_token_nll_sum(self.stack.logits(hidden, batch.input_ids), batch.targets)[0])
        return M.cosine_drift_sum(self.stack.final_hidden(hidden), reference)

    def target(self, inputs_embeds: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        """Differentiable per-window score for attribution, ``(B,)``, larger = better.

        LM: ``sum_{t<T-1} log softmax(logits_t)[ids_{t+1}]`` (``extra`` = input ids).
        Encoder: ``sum_t cos(h_t, h_t^ref)`` (``extra`` = the reference final state).
        """
        if self.lm:
            logits = lm_logits(self.stack.model(inputs_embeds=inputs_embeds, use_cache=False))[:, :-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            return logp.gather(-1, extra[:, 1:, None].to(logp.device)).squeeze(-1).sum(-1)
        hidden = self.stack.model(inputs_embeds=inputs_embeds).last_hidden_state.float()
        return torch.nn.functional.cosine_similarity(hidden, extra.float(), dim=-1).sum(-1)

    def target_extra(self, batch: Batch) -> torch.Tensor:
        """The second argument of :meth:`target` for these windows."""
        if self.lm:
            return batch.targets
        with torch.no_grad():
            return self.reference(self.forward(batch))


#: (applies to this stack?, objective class), tried newest first; :class:`Objective` otherwise
_OBJECTIVES: list[tuple[Callable[[LayerStack], bool], type[Objective]]] = []


def register_objective(applies: Callable[[LayerStack], bool], objective: type[Objective]) -> None:
    """Score stacks for which ``applies(stack)`` holds with ``objective`` (e.g. image classifiers)."""
    _OBJECTIVES.insert(0, (applies, objective))


def objective_for(stack: LayerStack) -> Objective:
    """The objective a model is scored by: a registered one that applies, else :class:`Objective`."""
    for applies, objective in _OBJECTIVES:
        if applies(stack):
            return objective(stack)
    return Objective(stack)
