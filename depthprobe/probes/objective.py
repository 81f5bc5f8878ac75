"""The objective every measurement scores a model by, and the one place that knows where inputs go.

A causal LM is scored by its mean-token next-token loss (``lm_loss``). An encoder has no
next-token objective, so it is scored by the cosine drift of its final hidden state against
the full model's (``cosine_drift``: mean over tokens of 1 - cos(h_t, h_t^ref), so the full
model scores 0). The main pass, the drop sweep, attribution and pruning all score through
:class:`Objective`, so the two definitions cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from depthprobe.model.stack import LayerStack, lm_logits
from depthprobe.probes import metrics as M

LM_LOSS = "lm_loss"
COSINE_DRIFT = "cosine_drift"


def input_device(stack: LayerStack) -> torch.device:
    """Where input ids go: the embedding's device (with a ``device_map`` the blocks may sit elsewhere)."""
    if stack.embed is not None:
        return next(stack.embed.parameters()).device
    return stack.device


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
    encoders (from :meth:`reference`) and ``None`` for LMs.
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
        return input_device(self.stack)

    def forward(self, input_ids: torch.Tensor, head: bool = True):
        """The model's own forward; ``head=False`` stops at the final hidden state (no logits)."""
        model = self.stack.model if head else stream_model(self.stack)
        if self.lm:
            return model(input_ids=input_ids, use_cache=False)
        return model(input_ids=input_ids)

    def reference(self, out) -> torch.Tensor | None:
        """What drift is measured against: the full model's final hidden state (encoders)."""
        return None if self.lm else out.last_hidden_state.detach()

    def loss_sum(self, out, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Summed next-token NLL of a full forward (graph kept, for ``backward``) and its count."""
        return M.next_token_nll_sum(lm_logits(out), input_ids)

    def window_scores(self, out, input_ids: torch.Tensor, reference: torch.Tensor | None) -> np.ndarray:
        """Objective of each window from a forward's output, ``(B,)``."""
        if self.lm:
            return M.per_sequence_nll(lm_logits(out), input_ids).cpu().numpy()
        return M.per_sequence_drift(out.last_hidden_state, reference).cpu().numpy()

    def stream_scores(self, hidden: torch.Tensor, input_ids: torch.Tensor, reference: torch.Tensor | None) -> np.ndarray:
        """Objective of each window if ``hidden`` were the last block's output, ``(B,)``."""
        if self.lm:
            return M.per_sequence_nll(self.stack.logits(hidden, input_ids), input_ids).cpu().numpy()
        return M.per_sequence_drift(self.stack.final_hidden(hidden), reference).cpu().numpy()

    def stream_sum(self, hidden: torch.Tensor, input_ids: torch.Tensor, reference: torch.Tensor | None) -> float:
        """Summed objective (over predictions, or tokens for drift) with ``hidden`` as the last
        block's output: the logit lens."""
        if self.lm:
            return float(M.next_token_nll_sum(self.stack.logits(hidden, input_ids), input_ids)[0])
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

    def target_extra(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The second argument of :meth:`target` for these windows."""
        if self.lm:
            return input_ids
        with torch.no_grad():
            return self.reference(self.forward(input_ids))
