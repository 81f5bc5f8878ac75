"""The two norms a converted Pre-LN model runs on. Neither has parameters: the LayerNorm gain
and bias they replace were folded into the linears that read them.

Source: Jiang et al., "Pre-RMSNorm and Pre-CRMSNorm Transformers: Equivalent and Efficient
Pre-LN Transformers", NeurIPS 2023 (arXiv:2305.14858).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean_i x_i^2 + eps)`` over the last dimension, no gain, no bias.

    On a zero-mean ``x`` this equals ``LayerNorm(x)`` with unit gain and zero bias, since then
    the variance (ddof=0) is the mean square. Half-precision inputs are normalized in fp32.
    Shapes: ``(..., d) -> (..., d)``.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in _LOW_PRECISION:
            return F.rms_norm(x.float(), (self.dim,), eps=self.eps).to(x.dtype)
        return F.rms_norm(x, (self.dim,), eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class CRMSNorm(nn.Module):
    """Compressed RMSNorm: the zero-mean ``d``-vector ``x`` is stored as its first ``d-1``
    coordinates ``z`` (``x_d = -sum_i z_i``), and

        ``y = z / sqrt((sum_i z_i^2 + (sum_i z_i)^2) / d + eps)``

    which is ``RMSNorm(x)`` without its last coordinate (the readers fold that one in).
    Shapes: ``(..., d-1) -> (..., d-1)``; ``dim`` is the full width ``d``.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        zf = z.float() if z.dtype in _LOW_PRECISION else z
        norm = torch.linalg.vector_norm(zf, dim=-1, keepdim=True)  # (..., 1): one fused pass for sum z_i^2
        total = zf.sum(-1, keepdim=True)  # (..., 1)
        return (zf * torch.rsqrt((norm * norm + total * total) / self.dim + self.eps)).to(z.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim - 1} of {self.dim}, eps={self.eps}"


NORMS: dict[str, type[nn.Module]] = {"rmsnorm": RMSNorm, "crmsnorm": CRMSNorm}
