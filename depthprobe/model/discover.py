"""Find the sublayers of any block by inspection: module names, types and one traced forward.

A block's direct children are classified by type name, then by attribute name:
``attn`` (self_attn / attention / attn / self_attention / linear attention, or a ``mixer``
whose type is an attention), ``mlp`` (mlp / feed_forward / ffn / block_sparse_moe / experts /
MoE types), ``mixer`` (state-space or recurrent token mixers: Mamba, RG-LRU, short convs),
``norm`` (``*Norm*`` types, ``*norm*`` / ``ln_*`` names) or nothing (dropout, rotary...).

Names alone cannot say which norm belongs to which sublayer: ``post_attention_layernorm``
is the MLP's *input* norm in Llama and the attention's *output* norm in OLMo 2. So one
forward pass records, for every child call, the tensors it read and the tensor it returned:

- a norm whose output only a sublayer's core reads is that sublayer's input norm;
- following the core's output through the modules that read it (output norms, dropout,
  scales) ends at the sublayer's contribution: the last output no child reads (it is added
  to the residual stream by the block's own code). Zeroing it drops the sublayer.
- when another sublayer reads that output directly (Post-LN BERT: the attention module
  returns the new stream), the sublayer has no separable contribution.

Example:
    >>> spans = discover_sublayers(model, stack.blocks, input_ids)   # doctest: +SKIP
    >>> spans[0]["attn"].out, spans[0]["attn"].modules               # doctest: +SKIP
    ('self_attn', ('input_layernorm', 'self_attn'))
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from depthprobe.hooking import hooked

log = logging.getLogger(__name__)

#: the sublayer kinds that get their own columns (``grad_norm_attn``, ``drop_delta_loss_mlp``)
COLUMN_KINDS = ("attn", "mlp")

ATTN_NAMES = frozenset({"self_attn", "attention", "attn", "self_attention", "linear_attn", "attn_layer"})
MLP_NAMES = frozenset({"mlp", "feed_forward", "ffn", "block_sparse_moe", "experts", "moe", "mlp_block",
                       "feedforward", "channel_mix", "sparse_moe"})
MIXER_NAMES = frozenset({"mixer", "mamba", "temporal_block", "conv", "token_mixer", "ssm", "recurrent"})
_NORM_NAME = re.compile(r"(norm|^ln(_|\d|$)|_ln(_|\d|$))")


@dataclass(frozen=True)
class Sublayer:
    """One sublayer of one block, as block-relative module paths.

    ``modules`` are the modules whose parameters belong to it (exclusive input norms, the
    core, output norms); ``out`` is the module whose output is its contribution to the
    residual stream (``None``: not separable, so it cannot be dropped on its own).
    """

    kind: str
    core: str
    modules: tuple[str, ...]
    out: str | None


def classify(name: str, module: nn.Module) -> str | None:
    """``attn`` | ``mlp`` | ``mixer`` | ``norm`` | ``other`` (unrecognised, with weights) | None
    (a pass-through without weights: dropout, identity) for a direct child of a block."""
    if isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.Dropout, nn.Identity)) or "dropout" in name:
        return None
    tname = type(module).__name__.lower()
    if "norm" in tname:
        return "norm"
    if "attention" in tname or "attn" in tname:
        return "attn"
    if any(k in tname for k in ("mlp", "moe", "feedforward", "expert", "ffn", "channelmix")):
        return "mlp"
    if any(k in tname for k in ("mamba", "mixer", "rglru", "recurrent", "shortconv", "ssm", "timemix", "deltanet")):
        return "attn" if "attention" in tname else "mixer"
    if _NORM_NAME.search(name):
        return "norm"
    if next(module.parameters(), None) is None:  # a sublayer core has weights
        return None
    if name in ATTN_NAMES or "attn" in name:
        return "attn"
    if name in MLP_NAMES:
        return "mlp"
    if name in MIXER_NAMES:
        return "mixer"
    return "other"  # has weights (a scale, a projection): part of whatever chain it sits in


@dataclass
class _Call:
    name: str
    kind: str | None
    inputs: list[int] = field(default_factory=list)
    output: int | None = None


def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    if hasattr(value, "to_tuple"):
        return _first_tensor(value.to_tuple())
    return None


@contextlib.contextmanager
def _trace(blocks: nn.ModuleList, calls: list[list[_Call]], alive: list) -> Iterator[None]:
    """Record every direct child call of every block (``alive`` keeps tensors so ids stay unique)."""

    def hooks(layer: int, name: str, kind: str | None):
        def pre(module, args, kwargs):
            call = _Call(name, kind)
            for value in (*args, *kwargs.values()):
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    alive.append(value)
                    call.inputs.append(id(value))
            calls[layer].append(call)

        def post(module, args, kwargs, output):
            out = _first_tensor(output)
            if out is not None:
                alive.append(out)
                calls[layer][-1].output = id(out)

        return pre, post

    with contextlib.ExitStack() as registered:
        for layer, block in enumerate(blocks):
            for name, child in block.named_children():
                pre, post = hooks(layer, name, classify(name, child))
                registered.enter_context(hooked(child, pre=pre, post=post))
        yield


def trace_block_calls(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor) -> list[list[_Call]]:
    """One no-grad forward of ``model`` on ``input_ids``; the child calls of every block, in order."""
    calls: list[list[_Call]] = [[] for _ in blocks]
    alive: list = []
    with torch.no_grad(), _trace(blocks, calls, alive):
        try:
            model(input_ids=input_ids, use_cache=False)
        except TypeError:  # models whose forward takes no use_cache
            model(input_ids=input_ids)
    return calls


def sublayers_from_calls(calls: list[_Call]) -> dict[str, Sublayer]:
    """The sublayers of one block from its traced child calls (first core of each kind)."""
    found: dict[str, Sublayer] = {}
    for call in calls:
        if call.kind in ("attn", "mlp", "mixer") and call.kind not in found:
            found[call.kind] = _span(call, calls)
    return found


def _span(core: _Call, calls: list[_Call]) -> Sublayer:
    def readers(tensor_id: int) -> list[_Call]:
        return [c for c in calls if tensor_id in c.inputs]

    inputs = []
    for norm in calls:
        if norm.kind == "norm" and norm.output is not None and norm.output in core.inputs:
            if all(r.name == core.name for r in readers(norm.output)):
                inputs.append(norm.name)
    chain, current, out = [core.name], core.output, core.name
    seen = {core.name}
    while current is not None:
        nxt = [c for c in readers(current) if c.name not in seen]
        if not nxt:
            break
        if len(nxt) > 1 or nxt[0].kind in ("attn", "mlp", "mixer"):
            out = None  # another sublayer reads this output: not a residual contribution
            break
        seen.add(nxt[0].name)
        if nxt[0].kind is not None:  # dropout and other pass-throughs (maybe shared) are not the output
            chain.append(nxt[0].name)
            out = nxt[0].name
        current = nxt[0].output
    modules = tuple(dict.fromkeys([*inputs, *chain]))
    return Sublayer(core.kind, core.name, modules, out)


def discover_sublayers(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor) -> list[dict[str, Sublayer]]:
    """Per block, ``{kind: Sublayer}`` for the kinds it has (see the module docs)."""
    return [sublayers_from_calls(c) for c in trace_block_calls(model, blocks, input_ids)]


def bert_style_sublayers(block: nn.Module) -> dict[str, Sublayer] | None:
    """Post-LN BERT-style blocks (``attention`` / ``intermediate`` / ``output``): the
    contribution of each sublayer is its dense output projection, before the residual norm."""
    names = dict(block.named_children())
    if not {"attention", "intermediate", "output"} <= set(names):
        return None
    try:
        block.get_submodule("attention.output.dense")
        block.get_submodule("output.dense")
    except AttributeError:
        return None
    return {
        "attn": Sublayer("attn", "attention", ("attention",), "attention.output.dense"),
        "mlp": Sublayer("mlp", "intermediate", ("intermediate", "output"), "output.dense"),
    }


def router_of(module: nn.Module, num_experts: int | None) -> nn.Module | None:
    """The router (gate) inside an MoE sublayer: a child named ``gate`` / ``router`` whose
    output has one logit per expert, or ``None``."""
    for name, child in module.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in ("gate", "router", "router_gate", "gating") or not name:
            continue
        weight = getattr(child, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            if num_experts is None or weight.shape[0] == num_experts:
                return child
        inner = getattr(child, "classifier", None) or getattr(child, "linear", None) or getattr(child, "proj", None)
        if isinstance(inner, nn.Linear) and (num_experts is None or inner.out_features == num_experts):
            return child
    return None
