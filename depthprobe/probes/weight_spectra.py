"""``--metrics spectra``: data-free weight spectra of every matrix WeightWatcher 0.7.7 analyses.

Which modules count, as WW's default ``analyze()`` decides (its PyTorch layer iterator over
``model.named_modules()``, pooled Conv2d, no filters):

- the type comes from ``isinstance`` or the lower-cased ``str(type(module))`` (class and its
  module path), tested in this order: ``nn.Linear`` or ``"linear"`` -> dense, ``nn.Conv1d``
  or ``"conv1d"`` (also transformers' GPT-2 ``Conv1D``), ``nn.Conv2d`` or ``"conv2d"``,
  ``nn.Embedding`` or ``"embedding"``, ``"norm"`` -> a norm (never analysed); the module needs
  a ``weight``;
- a 2-D weight ``N x M`` (N the larger side) is one matrix (receptive field ``rf = 1``); a
  Conv2d kernel ``(out, in, kh, kw)`` is ``kh*kw`` pooled slices, ``rf = kh*kw``;
- kept when ``M * rf >= 8`` (``min_evals``), ``M * rf <= 15000`` (``max_evals``) and
  ``N <= 50000`` (``max_N``: embeddings of a large vocabulary are left out). A tied LM head is
  its own module, so it is a row of its own (computed once).

Every module skipped for a reason a user can act on is counted; when nothing qualifies the
run stops with one line that says what was skipped and why (WW silently returns an empty
table). Weights are read one module at a time (an offloaded module's weights once, then
given back) and the metrics are :mod:`depthprobe.probes.esd`'s pure functions.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits
from torch import nn
from tqdm.auto import tqdm

from depthprobe.errors import DepthprobeError
from depthprobe.model.stack import LayerStack
from depthprobe.model.system import available_memory
from depthprobe.probes import esd
from depthprobe.probes.offload import offload_hooks, resident
from depthprobe.probes.sweep import SweepOutput

MIN_EVALS = 8  # WW's min_evals: M * rf
MAX_EVALS = 15000  # WW's max_evals: M * rf
MAX_N = 50000  # WW's max_N: the larger side

#: ``spectra.csv`` columns, the contract first
SPECTRA_COLUMNS = ["name", "layer", "alpha", "alpha_weighted", "stable_rank", "spectral_norm", "layer_type", "N",
                   "M", "rf", "num_evals", "xmin", "ks_distance", "num_pl_spikes", "log_spectral_norm", "norm",
                   "sv_max", "status"]
#: per-matrix column -> its block mean in ``layers.csv``
BLOCK_COLUMNS = {"alpha": "spectra_alpha", "alpha_weighted": "spectra_alpha_weighted",
                 "stable_rank": "spectra_stable_rank", "spectral_norm": "spectra_spectral_norm"}


@dataclass(frozen=True)
class Matrix:
    """One module WW analyses: its pooled ESD has ``M * rf`` eigenvalues."""

    name: str
    module: nn.Module
    kind: str  # dense | conv1d | conv2d | embedding
    N: int  # noqa: N815 - WW's names
    M: int  # noqa: N815
    rf: int
    layer: float  # block index, NaN outside the blocks


def ww_layer_type(module: nn.Module) -> str | None:
    """WW's layer type of ``module`` (``dense``, ``conv1d``, ``conv2d``, ``embedding``, ``norm``) or None."""
    typestr = str(type(module)).lower()
    if isinstance(module, nn.Linear) or "linear" in typestr:
        return "dense"
    if isinstance(module, nn.Conv1d) or "conv1d" in typestr:
        return "conv1d"
    if isinstance(module, nn.Conv2d) or "conv2d" in typestr:
        return "conv2d"
    if isinstance(module, nn.Embedding) or "embedding" in typestr:
        return "embedding"
    return "norm" if "norm" in typestr else None


def matrix_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """``(N, M, rf)`` as WW sets them for a weight of ``shape``, or None if it cannot be a matrix.

    Conv2d ``(out, in, kh, kw)``: WW transposes each slice to ``N >= M`` and swaps its ``N, M``
    once per slice, so with ``out < in`` they end swapped only for an odd number of slices
    (and not at all when the kernel is larger than the channels)."""
    if kind != "conv2d":
        return (max(shape), min(shape), 1) if len(shape) == 2 else None
    if len(shape) != 4:
        return None
    out, inp, kh, kw = shape
    rf = kh * kw
    if out + inp >= kh + kw and out < inp and rf % 2 == 1:
        return inp, out, rf
    return out, inp, rf


def block_modules(stack) -> list[nn.Module]:
    """The block modules of a :class:`LayerStack` (or a vision stack, whose blocks carry ``.module``)."""
    return [getattr(block, "module", block) for block in stack.blocks]


def find_matrices(model: nn.Module, blocks: Sequence[nn.Module] = ()) -> tuple[list[Matrix], dict[str, list[str]]]:
    """The modules WW analyses, in ``named_modules`` order (``layer``: the index of the block in
    ``blocks`` holding it), and ``reason -> names`` of the skipped modules that hold a weight."""
    owner = {id(sub): i for i, block in enumerate(blocks) for sub in block.modules()}
    found, skipped = [], defaultdict(list)
    for name, module in model.named_modules():
        kind = ww_layer_type(module)
        weight = getattr(module, "weight", None)
        if kind is None or not isinstance(weight, torch.Tensor):
            if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
                skipped["not a Linear, Conv1D, Conv2d or Embedding layer"].append(name)
            continue
        if kind == "norm":
            skipped["norm layers (no matrix)"].append(name)
            continue
        shape = matrix_shape(kind, tuple(weight.shape))
        if shape is None:
            skipped[f"{kind} weights of {weight.dim()} dims (WW needs 2, or 4 for Conv2d)"].append(name)
            continue
        n, m, rf = shape
        reason = _size_reason(n, m, rf)
        if reason:
            skipped[reason].append(name)
            continue
        found.append(Matrix(name, module, kind, n, m, rf, owner.get(id(module), math.nan)))
    return found, dict(skipped)


def _size_reason(n: int, m: int, rf: int) -> str | None:
    if m * rf < MIN_EVALS:
        return f"fewer than {MIN_EVALS} eigenvalues (smaller side x receptive field < {MIN_EVALS})"
    if m * rf > MAX_EVALS:
        return f"more than {MAX_EVALS} eigenvalues (smaller side x receptive field > {MAX_EVALS})"
    if n > MAX_N:
        return f"a side longer than {MAX_N} (e.g. a large vocabulary's embeddings)"
    return None


def skipped_text(skipped: dict[str, list[str]]) -> str:
    """``"3 module(s) skipped: 2 norm layers (no matrix) (e.g. norm, ln_f), 1 ..."`` (empty when
    nothing was skipped), the most common reason first."""
    if not skipped:
        return ""
    ranked = sorted(skipped.items(), key=lambda item: -len(item[1]))
    parts = ", ".join(f"{len(names)} {reason} (e.g. {', '.join(names[:2])})" for reason, names in ranked)
    return f"{sum(map(len, skipped.values()))} module(s) skipped: {parts}"


def matrix_eigenvalues(matrix: Matrix) -> np.ndarray:
    """The pooled ESD of one module (its weights read once; an offloaded module's given back)."""
    pin = resident([matrix.module]) if offload_hooks(matrix.module) else contextlib.nullcontext()
    with pin, torch.no_grad():
        w = matrix.module.weight.detach()
        if w.is_meta:
            raise DepthprobeError(f"{matrix.name}: its weights are on the meta device (not loaded), so spectra "
                                  "cannot read them; load the model with its weights (or an offload folder)")
        if w.device.type not in ("cpu", "cuda"):  # float64 is CPU / CUDA only (not MPS)
            w = w.cpu()
        if matrix.kind == "conv2d":
            slices = w.permute(2, 3, 0, 1).reshape(-1, w.shape[0], w.shape[1])
            return np.sort(esd.gram_eigenvalues(slices, esd.CONV2D_SCALE).reshape(-1))
        return esd.gram_eigenvalues(w)


def matrix_row(matrix: Matrix, evals: np.ndarray) -> dict:
    """One ``spectra.csv`` row from a module's ESD."""
    finite = bool(np.isfinite(evals).all())
    fit = esd.power_law_fit(evals) if finite else None
    alpha = fit.alpha if fit is not None else math.nan
    norms = esd.norm_metrics(evals, alpha) if finite else dict.fromkeys(
        ("spectral_norm", "log_spectral_norm", "norm", "stable_rank", "alpha_weighted"), math.nan)
    return {
        "name": matrix.name, "layer": matrix.layer, "alpha": alpha, "alpha_weighted": norms["alpha_weighted"],
        "stable_rank": norms["stable_rank"], "spectral_norm": norms["spectral_norm"], "layer_type": matrix.kind,
        "N": matrix.N, "M": matrix.M, "rf": matrix.rf, "num_evals": len(evals),
        "xmin": fit.xmin if fit else math.nan, "ks_distance": fit.ks_distance if fit else math.nan,
        "num_pl_spikes": fit.num_pl_spikes if fit else 0, "log_spectral_norm": norms["log_spectral_norm"],
        "norm": norms["norm"], "sv_max": math.sqrt(norms["spectral_norm"]) if finite else math.nan,
        "status": fit.status if fit else "non-finite weights",
    }


def spectra_table(model: nn.Module, blocks: Sequence[nn.Module] = (),
                  progress: bool = True) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """``spectra.csv`` (one row per matrix, :data:`SPECTRA_COLUMNS`) and the skip counts;
    ``layer`` is the index in ``blocks`` of the block holding the matrix (NaN outside).

    Raises:
        DepthprobeError: no matrix qualifies (the line says what was skipped and why).
    """
    matrices, skipped = find_matrices(model, blocks)
    if not matrices:
        why = skipped_text(skipped) or "the model has no Linear, Conv1D, Conv2d or Embedding layer with a weight"
        raise DepthprobeError(f"--metrics spectra: no weight matrix of {type(model).__name__} qualifies under "
                              f"WeightWatcher's rules: {why}")
    # a tied head shares its embedding's Parameter: its ESD is computed once (only Conv2d changes a weight's ESD)
    keys = [(id(matrix.module.weight), matrix.kind == "conv2d") for matrix in matrices]
    unique = list({key: matrix for key, matrix in zip(keys, matrices, strict=True)}.items())
    bar = tqdm(total=len(unique), desc="spectra", unit="matrix", disable=not progress, leave=False, delay=0.5)
    with bar, _pool(matrices) as pool:
        done = {}
        for (key, _), evals in zip(unique, pool.map(lambda item: matrix_eigenvalues(item[1]), unique), strict=True):
            done[key] = evals
            bar.update()
    rows = [matrix_row(matrix, done[key]) for matrix, key in zip(matrices, keys, strict=True)]
    return pd.DataFrame(rows, columns=SPECTRA_COLUMNS), skipped


@contextlib.contextmanager
def _pool(matrices: Sequence[Matrix]):
    """Matrices in parallel, one BLAS thread each, on up to ``torch.get_num_threads()`` workers:
    the O(M^3) eigen-solve scales poorly inside LAPACK and well across matrices (numpy's
    matmul and ``eigvalsh`` release the GIL). Fewer workers when the largest matrices' working
    sets would not fit in the memory available now. Serial (one matrix at a time, BLAS on all
    threads) with one thread, on CUDA, and for offloaded weights (read one at a time)."""
    workers = min(torch.get_num_threads(), _workers_that_fit(matrices))
    serial = workers <= 1 or any(offload_hooks(m.module) or m.module.weight.device.type != "cpu" for m in matrices)
    if serial:  # BLAS threads follow torch's setting, as everywhere else in a run
        with threadpool_limits(max(torch.get_num_threads(), 1)):
            yield _Serial()
        return
    with threadpool_limits(1), ThreadPoolExecutor(workers) as pool:
        yield pool


def _workers_that_fit(matrices: Sequence[Matrix]) -> int:
    """How many of the largest matrices' Gram working sets fit in half the CPU memory available now."""
    room = available_memory().get("cpu")
    if room is None or not matrices:
        return len(matrices) or 1
    largest = max(esd.gram_working_bytes(m.M) for m in matrices)
    return max(1, (room // 2) // largest)


class _Serial:
    @staticmethod
    def map(fn, items):
        return map(fn, items)


def block_means(table: pd.DataFrame, num_layers: int) -> dict[str, list[float]]:
    """``spectra_<metric>[l]``: mean over block ``l``'s matrices of each :data:`BLOCK_COLUMNS`
    metric (failed fits left out of the alpha means); NaN for a block without a matrix."""
    inside = table[table["layer"].notna()]
    out = {}
    for column, block_column in BLOCK_COLUMNS.items():
        means = inside.groupby(inside["layer"].astype(int))[column].mean()
        out[block_column] = [float(means.get(layer, math.nan)) for layer in range(num_layers)]
    return out


def spectra_sweep(stack: LayerStack, progress: bool = True) -> SweepOutput:
    """``--metrics spectra`` as a sweep's output: block means, ``spectra.csv``, notes, time
    (``stack``: a :class:`LayerStack` or a vision stack)."""
    t0 = time.perf_counter()
    table, skipped = spectra_table(stack.model, block_modules(stack), progress)
    columns = block_means(table, len(stack))
    not_applicable = {}
    for column, values in columns.items():
        empty = [layer for layer, v in enumerate(values) if not np.isfinite(v)]
        if empty:
            not_applicable[column] = (f"blocks {empty} have no matrix WeightWatcher analyses"
                                      + (" or no power-law fit" if "alpha" in column else ""))
    failed = int((table["status"] != "success").sum())
    summary = {"spectra": {"matrices": len(table), "failed_fits": failed, "skipped": {reason: len(names) for reason, names in skipped.items()},
                           "conventions": "WeightWatcher 0.7.7 analyze() defaults"}}
    return SweepOutput(columns=columns, tables={"spectra": table}, summary=summary,
                       seconds=time.perf_counter() - t0, not_applicable=not_applicable)
