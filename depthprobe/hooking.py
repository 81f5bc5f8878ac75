"""The one place depthprobe registers torch hooks: context managers that always remove them.

Everything that hooks a module or a parameter (probes, structure discovery, the layer
stack's block swaps, vision passes, pruning) goes through :func:`hooked`, :func:`hooked_all`
or :func:`grad_hooks`, so no hook outlives its ``with`` block, even on an exception.
:mod:`depthprobe.probes.hooks` builds the named sites and block callbacks on these.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def hooked(module: nn.Module, *, pre: Callable | None = None, post: Callable | None = None,
           with_kwargs: bool = True) -> Iterator[None]:
    """Register a forward pre-hook and/or forward hook on ``module`` for the ``with`` block.

    With ``with_kwargs`` the hooks get ``(module, args, kwargs)`` / ``(module, args, kwargs,
    output)``, else ``(module, args)`` / ``(module, args, output)``; their return values act
    as in :meth:`torch.nn.Module.register_forward_hook`.
    """
    handles = []
    try:
        if pre is not None:
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=with_kwargs))
        if post is not None:
            handles.append(module.register_forward_hook(post, with_kwargs=with_kwargs))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def hooked_all(hooks: Iterable[tuple[nn.Module, Callable]], with_kwargs: bool = False) -> Iterator[None]:
    """Forward hooks ``(module, hook)`` on many modules at once (see :func:`hooked`)."""
    with contextlib.ExitStack() as stack:
        for module, hook in hooks:
            stack.enter_context(hooked(module, post=hook, with_kwargs=with_kwargs))
        yield


@contextlib.contextmanager
def grad_hooks(params: Iterable[torch.Tensor], hook: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """``hook(p)`` once each parameter's gradient has been accumulated, for the ``with`` block."""
    handles = []
    try:
        handles = [p.register_post_accumulate_grad_hook(hook) for p in params]
        yield
    finally:
        for handle in handles:
            handle.remove()
