"""``torchrun --nproc_per_node N -m depthprobe analyze ...``: calibration windows split across
processes, per-layer sums all-reduced, per-window results gathered; rank 0 writes.

Inside :func:`split_windows` each process measures a contiguous share of the windows (rank r
gets windows ``[N*r/W, N*(r+1)/W)``), and the places that turn measurements into results
call the reductions here, which are no-ops outside a split (or with one process):

- running sums (angular / cosine sums, variance, RMS, lens losses, token counts, router
  loads, drop angle sums, the base loss's NLL sum): :func:`reduce_sum` (``all_reduce``);
- running maxima (``max_abs_activation``): :func:`reduce_max`;
- per-window arrays (drop objectives, attribution masses, window losses): :func:`gather`
  concatenates them in window order, so bootstrap intervals and per-window tables are
  those of the one-process run, not averages of per-rank statistics;
- gradients: :func:`reduce_grads` sums each block parameter's gradient before its norm is
  taken (the norm of a sum is not the sum of norms).

Collectives use gloo on CPU and nccl on GPUs (:func:`init_from_env`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from depthprobe.data import Windows
from depthprobe.errors import DepthprobeError

__all__ = ["DistInfo", "Split", "active", "dist_info", "gather", "init_from_env", "rank_and_world", "reduce_grads", "reduce_max",
           "reduce_sum", "split_windows"]


@dataclass(frozen=True)
class Split:
    """This process's share of the windows."""

    rank: int
    world: int
    start: int
    stop: int
    total: int  # windows over all processes


_ACTIVE: ContextVar[Split | None] = ContextVar("depthprobe_split", default=None)


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialized process group, else from torchrun's
    environment (``RANK``, ``WORLD_SIZE``), else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank_and_world()[0] == 0


@dataclass(frozen=True)
class DistInfo:
    """This process's place under torchrun (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0  # the GPU index on this machine

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank, world size and local rank from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_from_env(device: str = "auto") -> bool:
    """Join torchrun's process group (nccl when this process uses a GPU, else gloo); True
    when this call started it (the caller destroys it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    gpu = device not in ("cpu", "mps") and torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if gpu else "gloo")
    return True


def active() -> Split | None:
    """The split in force (None outside :func:`split_windows` or with one process)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def split_windows(windows: Windows) -> Iterator[Windows]:
    """This process's contiguous share of ``windows`` (all of them with one process); the
    reductions of this module act only inside."""
    rank, world = rank_and_world()
    if world <= 1 or not dist.is_initialized():
        yield windows
        return
    n = windows.num_sequences
    if n < world:
        raise DepthprobeError(f"--num-sequences {n} is fewer than the {world} processes; give each at least one window")
    split = Split(rank, world, n * rank // world, n * (rank + 1) // world, n)
    token = _ACTIVE.set(split)
    try:
        yield Windows(windows.input_ids[split.start:split.stop], windows.source)
    finally:
        _ACTIVE.reset(token)


def _device() -> torch.device:
    """Where collective tensors live: the current GPU for nccl, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_reduce(value, op):
    if active() is None:
        return value
    tensor = torch.as_tensor(np.asarray(value, dtype=np.float64)).to(_device())
    dist.all_reduce(tensor, op=op)
    out = tensor.cpu().numpy()
    if isinstance(value, torch.Tensor):
        return torch.from_numpy(out).to(value.dtype)
    return float(out) if np.ndim(value) == 0 else out


def reduce_sum(value):
    """Sum over processes of a float, a numpy array or a tensor (float64 on the wire)."""
    return _all_reduce(value, dist.ReduceOp.SUM)


def reduce_max(value):
    """Element-wise maximum over processes."""
    return _all_reduce(value, dist.ReduceOp.MAX)


def gather(array, axis: int = -1) -> np.ndarray:
    """Per-window arrays of every process concatenated along the window ``axis``, in rank
    (hence window) order."""
    if active() is None:
        return array
    parts: list = [None] * active().world
    dist.all_gather_object(parts, np.asarray(array))
    return np.concatenate(parts, axis=axis)


def gather_rows(rows: list) -> list:
    """Every process's ``rows`` (picklable items), concatenated in rank order (inside a split)."""
    if active() is None:
        return rows
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return [row for part in parts for row in part]


def reduce_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum every parameter's ``.grad`` over processes (in place), before norms are taken."""
    if active() is None:
        return
    for p in params:
        if p.grad is None:  # every process holds the same model: all or none have it
            continue
        grad = p.grad if p.grad.device.type != "cpu" or dist.get_backend() != "nccl" else p.grad.to(_device())
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        if grad is not p.grad:
            p.grad.copy_(grad.cpu())


def total_windows(local: int) -> int:
    """Windows over all processes (``local`` outside a split)."""
    split = active()
    return split.total if split is not None else local
