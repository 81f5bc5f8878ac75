"""Offloaded models (accelerate ``device_map`` with a cpu or disk share): which modules are
offloaded, and the one-line refusals of what cannot run that way."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from depthprobe.errors import DepthprobeError


def offloaded_modules(model: torch.nn.Module) -> list[str]:
    """Modules whose weights accelerate keeps off the execution device and moves in for
    each forward (``device_map`` with a cpu or disk share next to a faster device)."""
    names = []
    for name, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is not None and any(getattr(h, "offload", False) for h in getattr(hook, "hooks", [hook])):
            names.append(name)
    return names


def check_offload_supports(model: torch.nn.Module, metrics: Sequence[str]) -> None:
    """One-line refusals after an offloaded load: a model put on disk whole (accelerate
    cannot run it), and attribution on offloaded modules (it needs the whole model's graph
    at once; ``grad`` runs its backward block by block instead)."""
    placement = getattr(model, "hf_device_map", None) or {}
    if set(placement) == {""} and placement[""] == "disk":
        raise DepthprobeError(
            "--max-memory leaves no room for even one block, so accelerate put the whole model on disk as one "
            "piece (which it cannot run); give the cpu (or GPU) budget at least a few blocks"
        )
    if "attribution" in metrics and offloaded_modules(model):
        raise DepthprobeError(
            "--metrics attribution needs every block's weights in memory at once, and some modules were offloaded; "
            "drop attribution from --metrics (grad, drop and the forward metrics work offloaded), raise "
            "--max-memory, or use --dtype bfloat16"
        )
