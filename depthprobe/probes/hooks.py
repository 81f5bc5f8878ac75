"""Temporary hooks on a :class:`LayerStack`, always removed when the ``with`` block ends.

Every hook in depthprobe is registered through :func:`~depthprobe.hooking.hooked` (module
hooks) or :func:`~depthprobe.hooking.grad_hooks` (parameter gradients), so none outlives its
``with``; this module names the sites and builds block callbacks on them.

Hook sites are named as in TransformerLens, one grammar for hooks, tables and the report:

- ``blocks.{l}.resid_pre``: block l's input x_l (the residual stream before it);
- ``blocks.{l}.attn_out``: what block l's attention sublayer adds to the stream;
- ``blocks.{l}.resid_mid``: the stream between the sublayers (the input of the MLP's first
  module: its norm in a Pre-LN block);
- ``blocks.{l}.mlp_out``: what block l's MLP sublayer adds;
- ``blocks.{l}.resid_post``: block l's raw output x_{l+1}.

Block callbacks receive ``(l, x_l, x_{l+1})``: block ``l``'s input and raw output, the same
``x_l`` that the metric definitions and the ``layer`` column of every table use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from depthprobe.errors import DepthprobeError
from depthprobe.hooking import grad_hooks, hooked, hooked_all  # noqa: F401 - re-exported: the probes' one import
from depthprobe.model.stack import LayerStack, block_output

#: callback(layer, x_in, x_out) for every block, in forward order
BlockCallback = Callable[[int, torch.Tensor, torch.Tensor], None]
#: the points of a block that :func:`site` names, in forward order
SITE_POINTS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")


def site(layer: int, point: str) -> str:
    """The name of a hook site, ``blocks.{layer}.{point}`` (``point`` in :data:`SITE_POINTS`)."""
    if point not in SITE_POINTS:
        raise DepthprobeError(f"unknown hook site {point!r}; choose from {', '.join(SITE_POINTS)}")
    return f"blocks.{layer}.{point}"


def site_module(stack: LayerStack, name: str) -> tuple[nn.Module, str]:
    """The module behind a site name and whether its ``"input"`` or ``"output"`` is the site."""
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "blocks" or not parts[1].lstrip("-").isdigit() or parts[2] not in SITE_POINTS:
        raise DepthprobeError(f"hook site {name!r} is not blocks.<layer>.<{'|'.join(SITE_POINTS)}>")
    layer, point = stack.check_index(int(parts[1])), parts[2]
    if point in ("resid_pre", "resid_post"):
        return stack.blocks[layer], "input" if point == "resid_pre" else "output"
    if point == "resid_mid":
        mlp = stack.sublayer_modules(layer, "mlp")
        module, where = (mlp[0], "input") if mlp else (None, "input")
    else:
        module, where = stack.sublayer_output_module(layer, point.split("_")[0]), "output"
    if module is None:
        raise DepthprobeError(f"block {layer} of this model has no {point} site (no separable sublayer found)")
    return module, where


@contextlib.contextmanager
def watch_sites(stack: LayerStack, callbacks: Mapping[str, Callable[[torch.Tensor], None]]) -> Iterator[None]:
    """Call ``callbacks[name](tensor)`` with the activation at each named site as the model runs.

    Example::

        seen = {}
        with watch_sites(stack, {"blocks.0.attn_out": lambda t: seen.setdefault("a", t)}):
            model(input_ids=ids)
    """
    def reader(callback, where: str):
        def pre(module, args, kwargs):
            callback(block_input(args, kwargs))

        def post(module, args, kwargs, output):
            callback(block_output(output))

        return {"pre": pre} if where == "input" else {"post": post}

    with contextlib.ExitStack() as exits:
        for name, callback in callbacks.items():
            module, where = site_module(stack, name)
            exits.enter_context(hooked(module, **reader(callback, where)))
        yield


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden-state input of a block call, positional or keyword."""
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def watch_blocks(stack: LayerStack, callback: BlockCallback, layers: list[int] | None = None) -> Iterator[None]:
    """Call ``callback(l, x_l, x_{l+1})`` after every block ``l`` runs (inputs not detached)."""
    def make(layer: int):
        def hook(module, args, kwargs, output):
            callback(layer, block_input(args, kwargs), block_output(output))

        return hook

    layers = range(len(stack)) if layers is None else layers
    with hooked_all(((stack.blocks[layer], make(layer)) for layer in layers), with_kwargs=True):
        yield


@contextlib.contextmanager
def zero_output(module: torch.nn.Module) -> Iterator[None]:
    """Make ``module`` contribute nothing: its (first) output is replaced by zeros."""

    def hook(mod, args, output):
        if isinstance(output, (tuple, list)):
            return type(output)([torch.zeros_like(output[0]), *output[1:]])
        return torch.zeros_like(output)

    with hooked(module, post=hook, with_kwargs=False):
        yield


@contextlib.contextmanager
def only_blocks_require_grad(stack: LayerStack) -> Iterator[None]:
    """Gradients for block parameters only (embeddings and head are not needed for
    per-block gradient norms, and skipping them saves the head's large weight gradient).
    Previous ``requires_grad`` flags and ``.grad`` values are restored afterwards."""
    params = list(stack.model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    block_ids = {id(p) for p in stack.blocks.parameters()}
    try:
        for p in params:
            p.requires_grad_(id(p) in block_ids)
            p.grad = None
        yield
    finally:
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode (no dropout) for the ``with`` block; its train/eval mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
