"""Where a block's mid state (``blocks.{l}.resid_mid``: the stream after the attention
sublayer, before the MLP) can be read, found by inspection, never by family name.

The mid state is m_l = x_l + a_l, with a_l the attention sublayer's contribution (the output
of its ``out`` module: ``self_attn`` in Llama, ``post_attention_layernorm`` in Gemma 2's
sandwich norms). It is read as the input of the MLP sublayer's first module (its input norm
in a Pre-LN block). Whether that input *is* x_l + a_l is checked once, on one traced forward
of a few tokens: it is not in a parallel block (GPT-J, Phi, GPT-NeoX's parallel residual:
the MLP reads x_l), in a Post-LN block (the stream is normalized in place) or where the
contribution is scaled before it is added; those blocks have no mid state (not applicable). Offloaded models get none either: the
traced forward would read every offloaded block once more.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from depthprobe.hooking import hooked
from depthprobe.model.offload import offloaded_modules

#: relative mismatch ||m - (x + a)|| / ||a|| up to which the MLP's input is taken as x + a
MID_TOLERANCE = 1e-3


def mid_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The state a module call reads: its first floating-point tensor argument."""
    for value in (*args, kwargs.get("hidden_states"), *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
    return None


def _output_tensor(output) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def mid_modules(stack) -> dict[int, nn.Module]:
    """Per block with a readable mid state: the module whose *input* is x_l + a_l (cached on
    the stack; one no-grad forward of :meth:`LayerStack.probe_ids` the first time)."""
    cached = stack.__dict__.get("_mid_modules")
    if cached is not None:
        return cached
    if offloaded_modules(stack.model):  # the traced forward would read every offloaded block once more
        stack.__dict__["_mid_modules"] = {}
        return {}
    candidates = {}
    for layer in range(len(stack)):
        out, mlp = stack.sublayer_output_module(layer, "attn"), stack.sublayer_modules(layer, "mlp")
        if out is not None and mlp:
            candidates[layer] = (out, mlp[0])
    found = _check_additive(stack, candidates) if candidates else {}
    stack.__dict__["_mid_modules"] = found
    return found


def _check_additive(stack, candidates: dict[int, tuple[nn.Module, nn.Module]]) -> dict[int, nn.Module]:
    seen: dict[tuple[str, int], torch.Tensor] = {}

    def keep(key):
        def pre(module, args, kwargs):
            tensor = mid_input(args, kwargs)
            if tensor is not None:
                seen.setdefault(key, tensor.detach())

        def post(module, args, kwargs, output):
            tensor = _output_tensor(output)
            if tensor is not None:
                seen.setdefault(key, tensor.detach())

        return pre, post

    with contextlib.ExitStack() as exits, torch.no_grad():
        for layer, (out, first) in candidates.items():
            exits.enter_context(hooked(stack.blocks[layer], pre=keep(("x", layer))[0]))
            exits.enter_context(hooked(out, post=keep(("a", layer))[1]))
            exits.enter_context(hooked(first, pre=keep(("m", layer))[0]))
        try:
            _probe_forward(stack)
        except Exception:  # noqa: BLE001 - a model that cannot be traced has no known mid state
            return {}
    return {layer: first for layer, (_, first) in candidates.items() if _is_sum(seen, layer)}


def _probe_forward(stack) -> None:
    """A few tokens through the model without its LM head (the base model holds the blocks)."""
    ids, model = stack.probe_ids(), stack.model
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model and any(m is stack.blocks for m in base.modules()):
        model = base
    try:
        model(input_ids=ids, use_cache=False)
    except TypeError:  # models whose forward takes no use_cache
        model(input_ids=ids)


def _is_sum(seen: dict, layer: int) -> bool:
    x, a, m = (seen.get((k, layer)) for k in ("x", "a", "m"))
    if x is None or a is None or m is None or not (x.numel() == a.numel() == m.numel()):
        return False
    a, m = a.reshape(x.shape), m.reshape(x.shape)  # OPT flattens the tokens before its MLP
    scale = float(a.double().norm())
    return scale > 0 and float((m.double() - (x + a).double()).norm()) <= MID_TOLERANCE * scale
