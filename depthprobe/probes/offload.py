"""accelerate's offloaded weights, held resident for layer-major execution, and freed memory
handed back to the kernel.

Which modules are offloaded is decided in one place, :func:`depthprobe.model.memory.offloaded_modules`;
this module reads the same hooks to pin a block's weights for the many forwards of a
layer-major sweep (:func:`resident`).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterable, Iterator

from torch import nn

from depthprobe.errors import DepthprobeError
from depthprobe.model.families import earlier_state_reader
from depthprobe.model.memory import offloaded_modules
from depthprobe.model.stack import LayerStack


def return_freed_memory() -> None:
    """Hand freed heap memory back to the kernel (glibc ``malloc_trim``; elsewhere a no-op).

    A block's weights read from disk are a few tensors of 30-90 MB; glibc serves the ones
    below its (self-raising) mmap threshold from the heap and keeps the heap after they are
    freed, so without a trim anonymous memory creeps up block after block.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc() if sys.platform.startswith("linux") else None


def offload_hooks(module: nn.Module) -> list:
    """accelerate hooks on ``module`` itself that read its weights in at every forward."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return [h for h in getattr(hook, "hooks", [hook]) if getattr(h, "offload", False)]


def is_offloaded(model: nn.Module) -> bool:
    """Whether accelerate offloads some of ``model``'s weights (:func:`offloaded_modules`)."""
    return bool(offloaded_modules(model))


def use_layer_major(order: str, model: nn.Module) -> bool:
    """``layer`` always, ``batch`` never, ``auto`` when accelerate offloads some weights, except
    where blocks read state an earlier block left (layer-major runs each block on its own):
    batch-major then, and ``layer`` is refused in one line."""
    refusal = layer_major_refusal(getattr(model, "config", None), type(model).__name__)
    if order == "layer" and refusal:
        raise DepthprobeError(refusal)
    return not refusal and (order == "layer" or (order == "auto" and is_offloaded(model)))


def layer_major_refusal(config, name: str) -> str | None:
    """Why ``--execution layer`` cannot run the model ``name`` of ``config`` (its blocks read state
    an earlier block left, so they cannot run one at a time), in one line; None if it can."""
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    reader = earlier_state_reader(config) or earlier_state_reader(text)
    if reader is None:
        return None
    return (f"--execution layer cannot run {name}: {reader}, so its blocks cannot run one at a time; "
            "use --execution batch (or auto)")


@contextlib.contextmanager
def resident(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Load the offloaded weights of ``modules`` (and their submodules) once, keep them on
    the execution device for the ``with`` block, then give them back to accelerate.

    Inside, accelerate's hooks only move inputs (their ``offload`` flag is off), so the many
    forwards of layer-major execution do not read the weights again. A no-op for modules
    whose weights are resident anyway.
    """
    seen, pinned = set(), []
    for root in modules:
        for module in root.modules():
            if id(module) not in seen:
                seen.add(id(module))
                pinned += [(module, h) for h in offload_hooks(module)]
    try:
        for module, hook in pinned:
            hook.pre_forward(module)  # reads the weights from the weights map onto the device
            hook.offload = False
        yield
    finally:
        for module, hook in pinned:
            if not hook.offload:
                hook.offload = True
                hook.post_forward(module, None)  # back to the meta device: the memory is freed
        if pinned:
            return_freed_memory()


def outside_blocks(stack: LayerStack, part: str) -> list[nn.Module]:
    """Offloaded modules outside the blocks: ``"output"`` those of the final norm and head
    (needed to score a stream), ``"prelude"`` the others (embeddings, rotary tables...)."""
    inside = {id(m) for m in stack.blocks.modules()}
    output = {id(m) for root in (stack.final_norm, stack.head) if root is not None for m in root.modules()}
    return [m for m in stack.model.modules()
            if id(m) not in inside and offload_hooks(m) and ((id(m) in output) == (part == "output"))]
