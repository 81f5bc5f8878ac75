"""Layer-major execution: every window passes block l before block l+1 runs.

Batch-major execution (the model's own forward, batch after batch) needs every block once
per batch; when accelerate offloads weights to disk or CPU it reads a block's weights at
each of those calls, so a drop sweep reads every block once per batch and per drop
variant. Layer-major execution turns the loops around: block l is made resident once
(:func:`resident`), runs on every window's stream, and is released before block l+1, so
each block's weights are read **once per sweep**.

A block still runs through the model's own forward (:class:`BlockRunner`: only block l kept,
its input swapped in by a pre-hook, stopped right after it), so masks, rotary tables and
per-layer types stay the model's own; results equal the batch-major run.

Streams of all windows (the full model's x_0..x_L for the main pass; for the drop sweep the
full model's stream plus one per drop variant) live in a :class:`StateStore`, which spills
to a memory-mapped temporary file when it would not fit its memory budget.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from depthprobe import distributed
from depthprobe.data import Windows
from depthprobe.model.memory import available_memory, state_budget
from depthprobe.model.stack import LayerStack, block_output
from depthprobe.probes import metrics as M
from depthprobe.probes.grad_norms import BlockGradNorms
from depthprobe.probes.hooks import block_input, only_blocks_require_grad
from depthprobe.probes.main_pass import PassAccumulator, PassResult, ordered_columns
from depthprobe.probes.objective import Objective, stream_model
from depthprobe.probes.router import watch_routers

log = logging.getLogger(__name__)

__all__ = ["BlockRunner", "StateStore", "default_state_budget", "offload_hooks", "resident", "run_main_pass_layer_major",
           "supports_block_backward", "use_layer_major"]

ORDERS = ("auto", "batch", "layer")


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
    return any(offload_hooks(m) for m in model.modules())


def use_layer_major(order: str, model: nn.Module) -> bool:
    """``layer`` always, ``batch`` never, ``auto`` when accelerate offloads some weights."""
    return order == "layer" or (order == "auto" and is_offloaded(model))


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


class _Stop(Exception):
    """Raised after the one block a :class:`BlockRunner` call needs: the rest is not run."""


class BlockRunner:
    """Run single blocks of a model on given streams through the model's own forward.

    ``with runner.at(l): y = runner.run(ids, x)`` gives block l's output for input ``x``
    (the prelude, masks and rotary tables computed by the model from ``ids``).
    """

    def __init__(self, objective: Objective):
        self.objective = objective
        self.stack = objective.stack
        self._hidden: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._keep_graph = False

    def _forward(self, ids: torch.Tensor) -> None:
        model = stream_model(self.stack)
        try:
            if self.objective.lm:
                model(input_ids=ids, use_cache=False)
            else:
                model(input_ids=ids)
        except _Stop:
            return
        raise RuntimeError("the block of a layer-major call never ran")

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """x_0 of a batch: the first block's input, as the model's own prelude makes it."""
        def grab(module, args, kwargs):
            self._output = block_input(args, kwargs).detach()
            raise _Stop

        handle = self.stack.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self._forward(ids)
        finally:
            handle.remove()
        return self._output

    @contextlib.contextmanager
    def at(self, layer: int) -> Iterator[None]:
        """Keep only block ``layer``, resident, for the :meth:`run` calls inside."""
        block = self.stack.blocks[layer]

        def swap(module, args, kwargs):
            if args:
                return (self._hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": self._hidden}

        def stop(module, args, kwargs, output):
            out = block_output(output)
            self._output = out if self._keep_graph else out.detach()
            raise _Stop

        handles = [block.register_forward_pre_hook(swap, with_kwargs=True),
                   block.register_forward_hook(stop, with_kwargs=True)]
        try:
            with self.stack.keep_blocks([layer]), resident([block]):
                yield
        finally:
            for h in handles:
                h.remove()

    def run(self, ids: torch.Tensor, hidden: torch.Tensor, graph: bool = False) -> torch.Tensor:
        """Output of the block chosen by :meth:`at` for input ``hidden`` (on the input's device);
        with ``graph`` the output keeps its autograd graph (call under ``torch.enable_grad``)."""
        self._hidden, self._keep_graph = hidden, graph
        try:
            self._forward(ids)
        finally:
            self._hidden, self._keep_graph = None, False
        output, self._output = self._output, None
        return output


def default_state_budget() -> int:
    """Bytes of cached streams kept in RAM before spilling to disk: a quarter of the memory
    available now (``DEPTHPROBE_STATE_BUDGET`` overrides, in bytes)."""
    env = os.environ.get("DEPTHPROBE_STATE_BUDGET")
    if env:
        return int(float(env))
    return state_budget(available_memory()) or 1024**3  # 1 GiB when the available memory is unknown


class StateStore:
    """``count`` residual streams of all windows, ``(count, N, T, d)``, on the CPU.

    In RAM when they fit ``budget`` bytes, otherwise in a memory-mapped temporary file under
    ``folder`` (default: the system temp folder), removed by :meth:`close`: the page cache
    holds what is in use and the kernel writes the rest back, so anonymous memory stays flat.
    """

    def __init__(self, count: int, shape: tuple[int, ...], dtype: torch.dtype, budget: int,
                 folder: str | os.PathLike | None = None):
        numel = count * math.prod(shape)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.path: Path | None = None
        if nbytes <= budget:
            self.data = torch.empty((count, *shape), dtype=dtype)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="depthprobe-states-", dir=folder)
            self.path = Path(self._tmp.name) / "states.bin"
            with open(self.path, "wb") as f:
                f.truncate(nbytes)
            self.data = torch.from_file(str(self.path), shared=True, size=numel, dtype=dtype).view(count, *shape)
            log.info("layer-major states: %.2f GB spilled to %s (budget %.2f GB)", nbytes / 1e9, self.path, budget / 1e9)
        self.nbytes = nbytes

    @property
    def spilled(self) -> bool:
        return self.path is not None

    def close(self) -> None:
        self.data = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def batch_slices(n_windows: int, batch_size: int) -> list[slice]:
    return [slice(s, min(s + batch_size, n_windows)) for s in range(0, n_windows, batch_size)]


def open_store(runner: BlockRunner, input_ids: torch.Tensor, batch_size: int, count: int, budget: int | None,
               folder: str | os.PathLike | None) -> StateStore:
    """A store of ``count`` streams with x_0 (the prelude's output) of every window in slot 0."""
    device = runner.objective.device
    slices = batch_slices(input_ids.shape[0], batch_size)
    store = None
    for win in slices:
        x0 = runner.embed(input_ids[win].to(device))
        if store is None:
            budget = default_state_budget() if budget is None else budget
            store = StateStore(count, (input_ids.shape[0], *x0.shape[1:]), x0.dtype, budget, folder)
        store.data[0, win] = x0.cpu()
    return store


def run_main_pass_layer_major(stack: LayerStack, windows: Windows, metrics: Collection[str], *, batch_size: int,
                              loss: bool, progress: bool = True, budget: int | None = None,
                              spill_dir: str | os.PathLike | None = None) -> PassResult:
    """The main pass (angular, variance, lens, grad, base loss, router load) with each
    block's weights read once per direction: all windows pass block l, their outputs kept in
    a :class:`StateStore`; then the same :class:`PassAccumulator` as the batch-major pass
    reads the stored states batch by batch, so the numbers are the same.

    ``grad`` (causal LMs) adds a backward run block by block from the last: block l is loaded
    once more, re-run on its stored inputs with autograd and given dL/dx_{l+1} of each batch,
    which yields its parameters' gradients (reduced to norms and freed before block l-1
    loads) and dL/dx_l. Only one block's weights and gradients are in memory at a time.
    """
    objective = Objective(stack)
    acc = PassAccumulator(objective, metrics)
    grad = "grad" in metrics and objective.lm
    full = objective.lm and (loss or grad)
    runner, num_layers = BlockRunner(objective), len(stack)
    slices = batch_slices(windows.num_sequences, batch_size)
    bar = tqdm(total=num_layers * len(slices) * (2 if grad else 1), desc="analyze (layer-major)",
               disable=not progress, leave=False, delay=0.5)
    total = distributed.total_windows(windows.num_sequences) * (windows.seq_len - 1)
    t0 = time.perf_counter()
    # slots 0..L: x_0..x_L of every window; with grad one more for dL/dx of the block being run back
    with only_blocks_require_grad(stack) if grad else contextlib.nullcontext(), \
            resident(outside_blocks(stack, "prelude")), watch_routers(stack) as routers, \
            open_store(runner, windows.input_ids, batch_size, num_layers + (2 if grad else 1), budget,
                       spill_dir) as store:
        with torch.no_grad():
            for layer in range(num_layers):
                with runner.at(layer):
                    for win in slices:
                        ids = windows.input_ids[win].to(objective.device)
                        store.data[layer + 1, win] = runner.run(ids, store.data[layer, win].to(objective.device)).cpu()
                        bar.update()
        with resident(outside_blocks(stack, "output")), torch.no_grad():  # final norm and head, read once
            nll_sum, window_nll = _accumulate(acc, store.data, windows.input_ids, slices, full,
                                              total if grad else None)
        t_grad = time.perf_counter()
        grad_columns, not_applicable = _backward_by_block(runner, store.data, windows.input_ids, slices, bar) \
            if grad else ({}, {})
        t_grad = time.perf_counter() - t_grad
        bar.close()
        acc.reduce()  # torchrun: sums over all processes' windows (gradients: in BlockGradNorms)
        routers.reduce()
        columns = ordered_columns({**acc.columns(), **grad_columns, **routers.columns()})
    seconds = time.perf_counter() - t0
    timings = {"pass": seconds, **{k: v for k, v in acc.seconds.items() if k in metrics}}
    if grad:
        timings["grad"] = t_grad
    if not full:
        return PassResult(columns, timings, None, None, acc.angular_matrix())
    return PassResult(columns, timings, distributed.reduce_sum(nll_sum) / total,
                      np.asarray(distributed.gather(window_nll), float), acc.angular_matrix(), not_applicable)


def supports_block_backward(stack: LayerStack) -> bool:
    """The block-by-block backward needs each parameter in one block only."""
    return not BlockGradNorms(stack).shared_across_blocks


def _backward_by_block(runner: BlockRunner, data: torch.Tensor, input_ids: torch.Tensor, slices: list[slice],
                       bar) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Blocks L-1..0: re-run each on its stored inputs ``data[l]`` with autograd, backward from
    the upstream gradient in the last slot (replaced in place by dL/dx_l), reduce its
    parameters' gradients."""
    norms = BlockGradNorms(runner.stack)
    device = runner.objective.device
    upstream = data[-1]
    for layer in reversed(range(len(runner.stack))):
        with runner.at(layer):
            for win in slices:
                ids = input_ids[win].to(device)
                x = data[layer, win].to(device).requires_grad_(True)
                with torch.enable_grad():
                    y = runner.run(ids, x, graph=True)
                    y.backward(upstream[win].to(device=y.device, dtype=y.dtype))
                upstream[win] = x.grad.cpu()
                bar.update()
            norms.reduce_layer(layer)  # before accelerate takes the block's weights back
    return norms.columns()


def _accumulate(acc: PassAccumulator, data: torch.Tensor, input_ids: torch.Tensor, slices: list[slice],
                full: bool, total: int | None = None) -> tuple[float, list[float]]:
    """Feed the stored states x_0..x_L to ``acc`` batch by batch, as the batch-major pass
    does; the base loss (NLL sum, per-window mean NLL) when ``full``. With ``total`` (grad),
    the same logits also give dL/dx_L, L the mean next-token loss over all ``total``
    predictions (as the batch-major backward), written to the store's last slot."""
    objective = acc.objective
    stack, device, num_layers = objective.stack, objective.device, len(objective.stack)
    nll_sum, window_nll = 0.0, []
    for win in slices:
        ids = input_ids[win].to(device)
        states = [data[i, win].to(device) for i in range(num_layers + 1)]
        acc.start_batch(ids)
        for layer in range(num_layers):
            acc.on_block(layer, states[layer], states[layer + 1])
        if full:
            last = states[-1].detach().requires_grad_(total is not None)
            with torch.set_grad_enabled(total is not None):
                logits = stack.logits(last)
                nll, _ = M.next_token_nll_sum(logits, ids)
                if total is not None:
                    (nll / total).backward()
                    data[-1, win] = last.grad.cpu()
            nll_sum += float(nll.detach())
            window_nll += M.per_sequence_nll(logits.detach(), ids).tolist()
        acc.end_batch(None if objective.lm else stack.final_hidden(states[-1]))
    return nll_sum, window_nll
