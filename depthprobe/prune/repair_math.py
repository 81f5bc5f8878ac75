"""The maths of seam repair (:mod:`depthprobe.prune.repair`): spans, the least-squares and
cosine fits of the map ``T``, and fusing ``T`` into a writer's weights. Pure tensor functions.

- ``linear``: ``T = argmin ||m T - r||² + λ ||T - I||²`` in float64, solved as one least-squares
  problem on ``[m; √λ I] T = [r; √λ I]``. The ridge pulls toward ``T = I``, which is plain
  removal; ``λ = ridge * trace(mᵀm) / d`` (``ridge = 0``: ordinary least squares).
- ``cosine``: minimise the mean of ``1 - cos(y + m T, x_e)`` over tokens by Adam from a start map.
- fusing: ``W' = Tᵀ W``, ``b' = Tᵀ b`` for ``o = h Wᵀ + b``, so the writer computes ``o T``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def removed_spans(removed: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive indices as half-open ``(start, stop)``: [3,4,7] -> [(3,5),(7,8)]."""
    spans: list[tuple[int, int]] = []
    for i in sorted(set(removed)):
        if spans and spans[-1][1] == i:
            spans[-1] = (spans[-1][0], i + 1)
        else:
            spans.append((i, i + 1))
    return spans


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")  # GPT-2: y = x W + b, W (in, out)


def seam_maps(spans: list[tuple[int, int]], num_blocks: int, after: bool) -> list[tuple[int, int, int, int]]:
    """``(start, stop, p, e)`` for each map to fit: block ``p``'s writer sends the stream toward the
    full model's ``x_e``. Before each span ``p = start - 1, e = stop``; with ``after`` also the first
    kept block after it, ``p = stop, e = stop + 1`` (fit on the stream the first map repaired)."""
    maps = []
    for start, stop in spans:
        maps.append((start, stop, start - 1, stop))
        if after and stop < num_blocks:
            maps.append((start, stop, stop, stop + 1))
    return maps


def solve_linear(m: torch.Tensor, r: torch.Tensor, ridge: float = 0.0,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """``T = argmin_T Σ_t w_t² ||m_t T - r_t||² + λ ||T - I||²``, ``λ = ridge · Σ_t w_t² ||m_t||² / d``,
    in float64 (``w = 1`` without ``weights``).

    ``m, r``: (N, d). Solved by least squares on the stacked system ``[w m; √λ I] T = [w r; √λ I]``
    (no normal equations, so ``ridge = 0`` equals ``numpy.linalg.lstsq(m, r)``).
    """
    m64, r64 = m.double(), r.double()
    if weights is not None:
        m64, r64 = m64 * weights.double()[:, None], r64 * weights.double()[:, None]
    d = m64.shape[1]
    if ridge > 0:
        lam = ridge * float((m64 * m64).sum()) / d
        eye = torch.eye(d, dtype=torch.float64) * lam**0.5
        m64, r64 = torch.cat([m64, eye]), torch.cat([r64, eye])
    return torch.linalg.lstsq(m64, r64, driver="gelsd").solution


def solve_cosine(m: torch.Tensor, y: torch.Tensor, target: torch.Tensor, start: torch.Tensor, *,
                 steps: int = 300, lr: float = 1e-4, batch_tokens: int = 4096, seed: int = 0) -> torch.Tensor:
    """Minimise ``mean_t 1 - cos(y_t + m_t T, target_t)`` over T by Adam from ``start``."""
    T = start.float().clone().requires_grad_(True)
    opt = torch.optim.Adam([T], lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, m.shape[0], (min(batch_tokens, m.shape[0]),), generator=g)
        out = y[idx] + m[idx] @ T
        loss = (1 - torch.nn.functional.cosine_similarity(out, target[idx], dim=-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return T.detach().double()


@torch.no_grad()
def fuse_map(writer: nn.Module, T: torch.Tensor) -> None:
    """Make ``writer``'s output ``o`` become ``o T`` (row vectors), in place.

    ``nn.Linear`` (``o = h Wᵀ + b``): ``W ← Tᵀ W``, ``b ← Tᵀ b``; GPT-2 ``Conv1D``
    (``o = h W + b``): ``W ← W T``, ``b ← b T``. Computed in float64, stored in the weight's dtype.
    """
    T = T.double().to(writer.weight.device)
    w = writer.weight.double()
    new_w = w @ T if _is_conv1d(writer) else T.T @ w
    writer.weight.copy_(new_w.to(writer.weight.dtype))
    if getattr(writer, "bias", None) is not None:
        writer.bias.copy_((writer.bias.double() @ T).to(writer.bias.dtype))
