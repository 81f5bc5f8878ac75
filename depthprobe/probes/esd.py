"""Pure functions of a weight matrix's empirical spectral density (ESD). No modules, no I/O.

The conventions are WeightWatcher 0.7.7's (``weightwatcher.WeightWatcher.analyze`` with its
defaults), so the numbers can be compared one to one:

- **Eigenvalues.** For an ``N x M`` matrix ``W`` (``N >= M``, either orientation) the ESD is the
  ``M`` eigenvalues ``lambda_i = sigma_i^2`` of ``W^T W`` (``sigma_i`` the singular values), no
  normalisation by ``N``. A Conv2d kernel ``(out, in, kh, kw)`` gives ``kh*kw`` slices
  ``W[:, :, i, j]``, each scaled by ``sqrt(1/2)`` (WW's ``conv2d_norm``), and their eigenvalues
  pooled into one ESD of ``M * kh * kw`` values. Computed in float64, here from the smaller
  Gram matrix (``eigvalsh``), where WW takes float64 singular values of the float32 weights.
- **Power-law fit** (:func:`power_law_fit`, WW's own ``WWFit``, its default since 0.7): the
  eigenvalues above ``1e-5``, sorted, ``x_1 <= ... <= x_n``; for every candidate ``xmin = x_i``
  (all but the largest) the continuous MLE of Clauset et al. (2009) on the tail ``x_i..x_n``
  (``k = n - i + 1`` values, no ``xmax``)::

      alpha_i = 1 + k / sum_{j >= i} ln(x_j / x_i)

  and the Kolmogorov-Smirnov distance between the tail's empirical CDF ``(j - i) / k`` and
  the fitted CDF ``1 - (x_j / x_i)^(1 - alpha_i)``::

      D_i = max_{j >= i} | 1 - (x_j / x_i)^(1 - alpha_i) - (j - i) / k |   (D_i = 1 if alpha_i <= 1)

  ``xmin`` is the candidate with the smallest ``D`` (the first on ties). With fewer than 20
  eigenvalues above the threshold WW uses its small-sample fit instead
  (:func:`_small_sample_fit`: bias-corrected ``alpha = 1 + (k - 1) / sum ln(x_j/x_i)``, tails of
  at least 8, ``xmin`` minimising ``D - 0.868 / sqrt(k)``).
- **Norm metrics** (on all ``M`` eigenvalues): ``spectral_norm = lambda_max = sigma_max^2``
  (WW's name for the *squared* largest singular value), ``stable_rank = sum_i lambda_i /
  lambda_max = ||W||_F^2 / ||W||_2^2``, ``alpha_weighted = alpha * log10(lambda_max)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

#: eigenvalues at or below this are left out of the fit (WW's ``EVALS_THRESH`` on CPU)
EVALS_THRESH = 1e-5
#: below this many fitted eigenvalues WW switches to its small-sample fit
SMALL_N_CUTOFF = 20
#: Conv2d slices are scaled by this before their eigenvalues (WW's ``conv2d_norm``)
CONV2D_SCALE = math.sqrt(0.5)
_KS_BLOCK = 1 << 22  # candidate x tail cells per chunk of the vectorised KS scan
#: float64 values per row chunk of the Gram accumulation (16 MB)
GRAM_CHUNK = 1 << 21


@dataclass(frozen=True)
class PowerLawFit:
    """The fit of :func:`power_law_fit`; ``alpha`` is NaN when the fit failed (too few values)."""

    alpha: float
    xmin: float
    ks_distance: float  # D at the chosen xmin
    sigma: float  # (alpha - 1) / sqrt(k), k the tail size
    num_fitted: int  # eigenvalues above the threshold
    num_pl_spikes: int  # eigenvalues >= xmin (the tail)
    status: str  # "success" | "failed"


def gram_eigenvalues(w: torch.Tensor, scale: float = 1.0) -> np.ndarray:
    """Eigenvalues of ``(scale W)^T (scale W)`` for the smaller side of ``W`` (``(..., N, M)`` ->
    ``(..., min(N, M))`` sorted ascending, float64, clamped at 0); batched over leading dims.

    The Gram matrix is accumulated in float64 a chunk of rows at a time, so a float32 matrix
    never exists whole in float64. On CPU with numpy (``C^T C`` and ``np.linalg.eigvalsh``, which
    release the GIL, so matrices run in parallel threads; scipy's ``dsyrk`` / ``eigvalsh`` wrappers
    hold it), on CUDA with torch. Non-finite weights give NaN eigenvalues."""
    if w.shape[-2] < w.shape[-1]:
        w = w.transpose(-1, -2)
    if w.device.type != "cpu":
        return _gram_eigenvalues_torch(w, scale)
    flat = w.reshape(-1, *w.shape[-2:])
    out = np.stack([_gram_eigenvalues_cpu(flat[b], scale) for b in range(flat.shape[0])])
    return out.reshape(*w.shape[:-2], w.shape[-1])


def gram_working_bytes(m: int) -> int:
    """Bytes one :func:`gram_eigenvalues` call on an ``N x m`` matrix holds at its peak: the Gram
    matrix, LAPACK's copy of it, and one float64 row chunk."""
    return 2 * m * m * 8 + GRAM_CHUNK * 8


def _row_chunks(w: torch.Tensor):
    """``w`` (rows, m) in float64 pieces of about :data:`GRAM_CHUNK` values."""
    rows = max(1, GRAM_CHUNK // max(w.shape[-1], 1))
    for start in range(0, w.shape[-2], rows):
        yield w[..., start:start + rows, :].to(torch.float64)


def _gram_eigenvalues_cpu(w: torch.Tensor, scale: float) -> np.ndarray:
    m = w.shape[-1]
    gram = np.zeros((m, m), dtype=np.float64)
    for chunk in _row_chunks(w):
        c = chunk.numpy()
        gram += c.T @ c
    gram *= scale * scale
    if not np.isfinite(np.diagonal(gram)).all():  # G_kk = sum_i w_ik^2: non-finite iff a weight of column k is
        return np.full(m, np.nan)
    return np.clip(np.linalg.eigvalsh(gram), 0, None)


def _gram_eigenvalues_torch(w: torch.Tensor, scale: float) -> np.ndarray:
    m = w.shape[-1]
    gram = torch.zeros((*w.shape[:-2], m, m), dtype=torch.float64, device=w.device)
    for chunk in _row_chunks(w):
        chunk = chunk * scale
        gram += chunk.transpose(-1, -2) @ chunk
    if not torch.isfinite(gram).all():
        return np.full((*w.shape[:-2], m), np.nan)
    return torch.linalg.eigvalsh(gram).clamp_min(0).cpu().numpy()


def norm_metrics(evals: np.ndarray, alpha: float) -> dict[str, float]:
    """``spectral_norm`` (lambda_max), ``log_spectral_norm``, ``norm`` (sum lambda = ||W||_F^2),
    ``stable_rank`` (sum lambda / lambda_max), ``alpha_weighted`` (alpha log10 lambda_max)."""
    evals = np.asarray(evals, dtype=np.float64)
    lam_max = float(evals.max()) if evals.size else math.nan
    total = float(evals.sum())
    log_max = math.log10(lam_max) if lam_max > 0 else math.nan
    return {
        "spectral_norm": lam_max,
        "log_spectral_norm": log_max,
        "norm": total,
        "stable_rank": total / lam_max if lam_max > 0 else math.nan,
        "alpha_weighted": alpha * log_max,
    }


def power_law_fit(evals: np.ndarray, thresh: float = EVALS_THRESH) -> PowerLawFit:
    """WeightWatcher 0.7.7's power-law fit of an ESD (formulas in the module docstring)."""
    evals = np.asarray(evals, dtype=np.float64)
    data = np.sort(evals[evals > thresh])
    n = len(data)
    if n < 2:  # no candidate xmin: WW reports a failed fit (alpha = -1)
        return PowerLawFit(math.nan, math.nan, math.nan, math.nan, n, 0, "failed")
    if n < SMALL_N_CUTOFF:
        i, alpha, d = _small_sample_fit(data)
    else:
        i, alpha, d = _standard_fit(data)
    if not np.isfinite(alpha):
        return PowerLawFit(math.nan, math.nan, math.nan, math.nan, n, 0, "failed")
    xmin = float(data[i])
    return PowerLawFit(float(alpha), xmin, float(d), float((alpha - 1) / math.sqrt(n - i)), n,
                       int((evals >= xmin).sum()), "success")


def mle_alphas(data: np.ndarray) -> np.ndarray:
    """``alpha_i = 1 + k_i / (sum_{j>=i} ln x_j - k_i ln x_i)`` for every candidate ``i < n-1`` of
    sorted ``data`` (``k_i = n - i``); suffix sums make it O(n)."""
    logs = np.log(data)
    n = len(data)
    k = (n - np.arange(n - 1)).astype(np.float64)
    suffix = np.cumsum(logs[::-1])[::-1][:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1 + k / (suffix - k * logs[:-1])


def ks_distances(data: np.ndarray, alphas: np.ndarray, candidates: np.ndarray | None = None,
                 stride: int = 1) -> np.ndarray:
    """``D_i`` (module docstring) of the ``candidates`` (default: all ``n - 1``), chunked.

    With ``stride > 1`` only every ``stride``-th point of the tail enters the max:
    a lower bound of ``D_i``, used to rule candidates out cheaply."""
    n = len(data)
    cand = np.arange(n - 1) if candidates is None else np.asarray(candidates, dtype=np.int64)
    out = np.ones(len(cand))
    if len(cand) == 0:
        return out
    step = max(1, _KS_BLOCK * stride // n)
    for a in range(0, len(cand), step):
        i = cand[a:a + step]
        j = np.arange(i.min(), n, stride)  # the smallest tail in the chunk holds every other's points
        with np.errstate(all="ignore"):
            fitted = 1 - (data[None, j] / data[i, None]) ** (1 - alphas[i, None])
        ecdf = (j[None, :] - i[:, None]) / (n - i)[:, None]
        gap = np.where(j[None, :] >= i[:, None], np.abs(fitted - ecdf), 0.0)
        out[a:a + step] = np.where(alphas[i] > 1, gap.max(axis=1), 1.0)
    return out


def _standard_fit(data: np.ndarray) -> tuple[int, float, float]:
    """The chosen candidate ``(i, alpha_i, D_i)``: the first of smallest ``D``, found exactly.

    A strided lower bound of every ``D`` rules out candidates that cannot beat the exact ``D``
    of the most promising few; the survivors get the full scan, and near-ties (1e-9) are
    re-scored with WW's own per-candidate sums, so rounding never picks another xmin."""
    alphas = mle_alphas(data)
    n = len(data)
    stride = 8 if n > 256 else 1
    bound = ks_distances(data, alphas, stride=stride)
    promising = np.argsort(bound, kind="stable")[:8]
    best = float(ks_distances(data, alphas, promising).min())
    survivors = np.flatnonzero(bound <= best + 1e-9)
    ds = ks_distances(data, alphas, survivors) if stride > 1 else bound[survivors]
    close = survivors[ds <= ds.min() + 1e-9]
    rescored = [(_ww_candidate(data, int(i)), int(i)) for i in close]
    (alpha, d), i = min(rescored, key=lambda item: (item[0][1], item[1]))
    return i, alpha, d


def _ww_candidate(data: np.ndarray, i: int) -> tuple[float, float]:
    """``(alpha_i, D_i)`` exactly as WW's loop computes them (``np.sum`` of the tail's logs)."""
    logs = np.log(data)
    n = float(len(data) - i)
    with np.errstate(all="ignore"):
        alpha = 1 + n / (np.sum(logs[i:]) - n * logs[i])
        if not alpha > 1:
            return float(alpha), 1.0
        d = np.max(np.abs(1 - (data[i:] / data[i]) ** (-alpha + 1) - np.arange(n) / n))
    return float(alpha), float(d)


def _small_sample_fit(data: np.ndarray, k_min: int = 8) -> tuple[int, float, float]:
    """WW's fit for fewer than 20 values, as it ends up choosing: the bias-corrected
    ``alpha_i = 1 + (k - 1) / s_i`` (``s_i = sum_{j>=i} ln(x_j / x_i)``) on tails of at least
    ``k_min`` with ``s_i > 1e-12``, ``D_i`` where ``alpha_i > 1`` (1 elsewhere), and the first
    candidate of smallest ``D`` (WWFit re-picks by ``D`` after its ``D - 0.868/sqrt(k)``
    objective). With no valid tail, the whole sample (alpha 0 when all values are equal)."""
    logs = np.log(data)
    n = len(data)
    alphas, ds = np.zeros(n - 1), np.ones(n - 1)
    valid = False
    for i in range(n - 1):
        k = n - i
        s = float(np.sum(logs[i:]) - k * logs[i])
        if k < k_min or s <= 1e-12:
            continue
        alphas[i] = 1.0 + (k - 1.0) / s
        if alphas[i] > 1.0:
            ds[i] = float(np.max(np.abs(np.arange(k) / k - (1.0 - (data[i:] / data[i]) ** (1.0 - alphas[i])))))
            valid = True
    if not valid:
        s = float(np.sum(logs) - n * logs[0])
        if s > 1e-12:
            alphas[0] = 1.0 + (n - 1.0) / s
            ds[0] = float(np.max(np.abs(np.arange(n) / n - (1.0 - (data / data[0]) ** (1.0 - alphas[0])))))
    i = int(np.argmin(ds))
    return i, float(alphas[i]), float(ds[i])
