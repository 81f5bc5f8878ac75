"""Pure per-layer metric functions. No hooks, no state, no I/O.

Shapes: ``x`` is a residual-stream state ``(B, T, d)`` (or ``(N, d)`` tokens); layer index
``l`` is 0-based; ``x_l`` is the input of block ``l`` and ``x_{l+1}`` its raw output.
Every function returns *sums over tokens* (plus the token count where needed) so callers
can stream batch after batch and divide once at the end; ``mean_*`` helpers do the divide.
Computation is in float64 whatever the model's dtype, so bf16 runs give stable statistics.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def tokens(x: torch.Tensor) -> torch.Tensor:
    """``(..., d) -> (N, d)`` in float64."""
    return x.detach().reshape(-1, x.shape[-1]).to(torch.float64)


def unit(x: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """Token vectors scaled to unit L2 norm, ``(..., d) -> (N, d)`` float64."""
    t = tokens(x)
    return t / t.norm(dim=-1, keepdim=True).clamp_min(eps)


def cosine_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    """sum over tokens of cos(a_t, b_t)."""
    return float((unit(a) * unit(b)).sum(-1).clamp(-1, 1).sum())


def angular_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    """sum over tokens of arccos(cos(a_t, b_t)) / pi  (angular distance, Gromov et al. 2024)."""
    return float(torch.arccos((unit(a) * unit(b)).sum(-1).clamp(-1, 1)).sum() / math.pi)


def angular_gram_sums(units: list[torch.Tensor], chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """All-pairs sums over tokens for unit states ``u_0..u_L`` (each ``(N, d)``).

    Returns ``(ang, cos)``, both ``(L+1, L+1)`` float64, with
    ``ang[i, j] = sum_t arccos(<u_i,t, u_j,t>) / pi`` and ``cos[i, j] = sum_t <u_i,t, u_j,t>``.
    Tokens are processed ``chunk`` at a time so memory stays ``chunk * (L+1)^2``.
    """
    stacked = torch.stack(units, dim=1)  # (N, L+1, d)
    n_states = stacked.shape[1]
    ang = torch.zeros(n_states, n_states, dtype=torch.float64)
    cos = torch.zeros(n_states, n_states, dtype=torch.float64)
    for start in range(0, stacked.shape[0], chunk):
        u = stacked[start : start + chunk]
        g = torch.bmm(u, u.transpose(1, 2)).clamp(-1, 1)  # (n, L+1, L+1) cosines per token
        cos += g.sum(0).cpu()
        ang += (torch.arccos(g) / math.pi).sum(0).cpu()
    return ang, cos


def variance_sum(x: torch.Tensor) -> float:
    """sum over tokens of Var_d(x_t) (population variance over hidden dims, ddof=0)."""
    return float(tokens(x).var(dim=-1, unbiased=False).sum())


def rms_sum(x: torch.Tensor) -> float:
    """sum over tokens of sqrt(mean_d x_t^2)."""
    return float(tokens(x).pow(2).mean(-1).sqrt().sum())


def max_abs(x: torch.Tensor) -> float:
    """max over tokens and dims of |x|."""
    return float(x.detach().abs().max())


def next_token_nll_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token negative log-likelihoods and the number of predicted tokens.

    ``logits (B, T, V)`` predict ``input_ids[:, 1:]``; the result keeps the graph so it can be
    back-propagated. Mean-token LM loss = sum / count.
    """
    pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    target = input_ids[:, 1:].reshape(-1).to(pred.device)
    return F.cross_entropy(pred, target, reduction="sum"), target.numel()


def shifted_nll_sum(pred_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-Σ_i log softmax(pred_logits_i)[targets_i]`` over rows already aligned with their
    targets: ``pred_logits (B, T-1, V)`` of positions ``0..T-2``, ``targets (B, T-1)`` = the
    ids at ``1..T-1``; the same value as :func:`next_token_nll_sum` of the full logits."""
    pred = pred_logits.reshape(-1, pred_logits.shape[-1]).float()
    return F.cross_entropy(pred, targets.reshape(-1).to(pred.device), reduction="sum")


def per_sequence_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of each sequence, ``(B, T, V), (B, T) -> (B,)`` float64.

    Computed row by row on ``(T-1, V)`` rows: ``logits[b, :-1]`` of contiguous logits is
    contiguous, so no copy of the logits is made (``logits[:, :-1]`` flattened would copy
    them all), and the values equal those of the flattened ``(B*(T-1), V)`` computation.
    Cross-entropy over a strided class dim (``(B, V, T)``) drifts by ~1e-4 from the model's
    own loss on CPU, so it is not used.
    """
    targets = input_ids[:, 1:].to(logits.device)
    rows = [F.cross_entropy(logits[b, :-1].float(), targets[b], reduction="none") for b in range(logits.shape[0])]
    return torch.stack(rows).double().mean(1)


def cosine_drift_sum(hidden: torch.Tensor, reference: torch.Tensor) -> float:
    """sum over tokens of 1 - cos(hidden_t, reference_t): the encoder stand-in for LM loss."""
    return float((1 - (unit(hidden) * unit(reference)).sum(-1).clamp(-1, 1)).sum())


def per_sequence_drift(hidden: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(hidden_t, reference_t) per sequence, ``(B, T, d) x 2 -> (B,)`` float64."""
    cos = (unit(hidden) * unit(reference)).sum(-1).clamp(-1, 1)
    return (1 - cos).view(hidden.shape[0], -1).mean(1)


def squared_l2(t: torch.Tensor, chunk: int = 1 << 21) -> torch.Tensor:
    """``sum_i t_i^2`` in float64 (a 0-d tensor on ``t``'s device), ``chunk`` values at a
    time: ``vector_norm(t, dtype=float64)`` alone makes a float64 copy of all of ``t``
    (360 MB for one 4096 x 11008 matrix), a chunk's copy is 16 MB."""
    flat = t.detach().reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=t.device)
    for start in range(0, flat.numel(), chunk):
        total += torch.linalg.vector_norm(flat[start:start + chunk], dtype=torch.float64).square()
    return total


def grad_l2(params) -> float:
    """L2 norm of the gradients of ``params`` (those without a gradient count as zero)."""
    total = 0.0
    for p in params:
        if p.grad is not None:
            total += float(p.grad.detach().to(torch.float64).pow(2).sum())
    return math.sqrt(total)


def expert_counts(router_logits: torch.Tensor, top_k: int) -> np.ndarray:
    """How many tokens route to each expert: ``count[e] = #{t : e in top_k(router_logits[t])}``,
    ``(N, E) -> (E,)`` float64."""
    k = min(top_k, router_logits.shape[-1])
    chosen = router_logits.reshape(-1, router_logits.shape[-1]).topk(k, dim=-1).indices.reshape(-1)
    return np.bincount(chosen.cpu().numpy(), minlength=router_logits.shape[-1]).astype(np.float64)


def load_entropy(counts) -> float:
    """Entropy of the expert load, ``H = -sum_e p_e log p_e`` with ``p_e = count_e / sum(count)``
    (nats; ``log E`` for a perfectly balanced router, 0 when one expert takes every token)."""
    total = float(sum(counts))
    return float(-sum((c / total) * math.log(c / total) for c in counts if c > 0))
