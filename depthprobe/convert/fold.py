"""Pre-LN -> Pre-RMSNorm / Pre-CRMSNorm, exactly (Jiang et al., NeurIPS 2023, arXiv:2305.14858).

A Pre-LN block only ever sees its residual stream ``x`` through ``LayerNorm``, which ignores
the mean of ``x``. So the mean can be removed from everything that writes into the stream
without changing any output, and on a zero-mean stream ``LayerNorm == RMSNorm``:

1. fold each LayerNorm ``g * (x - mu) / sigma + beta`` into the linears ``W z + c`` that read
   it: ``W' = W diag(g)``, ``c' = c + W beta`` (the LM head gains a bias when ``beta != 0``);
   untie the head from the token embedding first;
2. center the embeddings (subtract each row's mean) and every linear that writes into the
   stream (``W' = W - 1 mean_rows(W)``, ``c' = c - mean(c)``): the stream is now zero-mean;
3. replace each LayerNorm by a parameter-free :class:`RMSNorm` with the same eps.

Pre-CRMSNorm goes one step further: a zero-mean ``d``-vector is determined by its first
``d-1`` coordinates (``x_d = -sum_i x_i``), so the stream is stored with ``d-1`` coordinates:
writers and embeddings keep their first ``d-1`` output rows, readers fold the dropped
coordinate in (``W' = W[:, :d-1] - W[:, d-1] 1^T``), and :class:`CRMSNorm` computes the norm
of the full vector from the ``d-1`` stored ones.

All arithmetic is done in float64 and rounded once per tensor to the model's dtype.

Which norm feeds which linears and which linears write the stream is architecture
knowledge: it lives in ``depthprobe.model.stack.FAMILIES`` (``Family.stream``).

Example:
    >>> from depthprobe.convert import convert_to_rmsnorm, save_converted  # doctest: +SKIP
    >>> model, tok = depthprobe.load_model("gpt2")                           # doctest: +SKIP
    >>> rms = convert_to_rmsnorm(model)            # a converted copy; model is unchanged
    >>> save_converted(rms, tok, "gpt2-rmsnorm")   # reloads with depthprobe.load_model
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from depthprobe.convert.norms import NORMS
from depthprobe.errors import DepthprobeError
from depthprobe.model.stack import FAMILIES, LayerStack
from depthprobe.model.stack import _get as _submodule  # submodule at a dotted path, or None

log = logging.getLogger(__name__)

#: config attribute that marks a converted model ("rmsnorm" or "crmsnorm"); load_model reads it
CONFIG_KEY = "depthprobe_norm"
KINDS = tuple(NORMS)


@dataclass
class _NormSite:
    parent: nn.Module
    attr: str
    norm: nn.LayerNorm
    readers: list[nn.Module]


@dataclass
class _Plan:
    """Where the stream is read and written in one model; every module validated."""

    width: int
    norms: list[_NormSite]
    writers: list[nn.Module]
    embeds: list[nn.Embedding]


def convert_to_rmsnorm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The Pre-RMSNorm twin of a Pre-LN ``model`` (same logits; see the module docs).

    Returns a converted copy unless ``inplace``. Raises :class:`DepthprobeError` for a model
    that is not Pre-LN with LayerNorm (Post-LN, already RMSNorm, unknown family).
    """
    return convert(model, "rmsnorm", inplace=inplace)


def convert_to_crmsnorm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The Pre-CRMSNorm twin of a Pre-LN ``model``: the residual stream has ``d-1`` coordinates."""
    return convert(model, "crmsnorm", inplace=inplace)


def convert(model: nn.Module, to: str, *, inplace: bool = False) -> nn.Module:
    """Convert ``model`` to ``to`` (``"rmsnorm"`` or ``"crmsnorm"``); see the module docs."""
    if to not in NORMS:
        raise DepthprobeError(f"unknown target norm {to!r}; choose one of {', '.join(KINDS)}")
    plan = _plan(model)
    if not inplace:
        model = copy.deepcopy(model)
        plan = _plan(model)
    _untie_head(model)
    compress = to == "crmsnorm"
    with torch.no_grad():
        for site in plan.norms:
            gain, bias = _norm_affine(site.norm)
            for reader in site.readers:
                weight, c = _get_affine(reader)  # (out, d), (out,)
                new_w = weight * gain
                new_c = (c if c is not None else 0) + weight @ bias
                if compress:
                    new_w = new_w[:, :-1] - new_w[:, -1:]
                keep_bias = c is not None or bool(bias.any())
                _set_affine(reader, new_w, new_c if keep_bias else None)
        for writer in plan.writers:
            weight, c = _get_affine(writer)  # (d, in), (d,)
            weight = weight - weight.mean(0, keepdim=True)
            c = c - c.mean() if c is not None else None
            if compress:
                weight, c = weight[:-1], (c[:-1] if c is not None else None)
            _set_affine(writer, weight, c)
        for embed in plan.embeds:
            table = embed.weight.detach().double()
            table = table - table.mean(1, keepdim=True)
            if compress:
                table = table[:, :-1]
            _set_param(embed, "weight", table)
            embed.embedding_dim = table.shape[1]
    _swap_norms(plan, to)
    setattr(model.config, CONFIG_KEY, to)
    log.info("converted %s to Pre-%s (%d norms)", type(model).__name__, to, len(plan.norms))
    return model


# ---------------------------------------------------------------------------- the plan
def _plan(model: nn.Module) -> _Plan:
    """Read the family table and check that ``model`` is a convertible Pre-LN model."""
    config = getattr(model, "config", None)
    done = getattr(config, CONFIG_KEY, None)
    if done:
        raise DepthprobeError(f"this model is already converted to {done}; convert the original Pre-LN model")
    stack = LayerStack.from_model(model)
    spec = stack.spec.stream if stack.spec is not None else None
    if spec is None:
        raise DepthprobeError(_refusal(model, stack))
    for attr, wanted, why in spec.pre_ln:
        if getattr(config, attr, wanted) != wanted:
            raise DepthprobeError(f"{stack.family} model with {attr}={getattr(config, attr)!r} {why}")
    base = _submodule(model, stack.spec.base) or model
    if stack.final_norm is None:
        raise DepthprobeError(
            f"this {stack.family} model has no final norm, so its head reads the stream's mean; it cannot be converted"
        )
    width = _norm_width(stack.final_norm, "the final norm")

    norms: list[_NormSite] = []
    writers: list[nn.Module] = []
    for i, block in enumerate(stack.blocks):
        for norm_path, reader_paths in spec.readers:
            norm = _require(block, norm_path, f"block {i}")
            _norm_width(norm, f"block {i} {norm_path}")
            readers = [_linear(block, p, f"block {i}", in_dim=width) for p in reader_paths]
            parent, attr = _parent_attr(block, norm_path)
            norms.append(_NormSite(parent, attr, norm, readers))
        writers += [_linear(block, p, f"block {i}", out_dim=width) for p in spec.writers]

    final_reader = _submodule(base, spec.final_reader) if spec.final_reader else None
    if final_reader is None:
        final_reader = stack.head
    if final_reader is None:
        raise DepthprobeError("this model has no LM head; load it as a causal LM (*ForCausalLM) to convert it")
    _check_linear(final_reader, "the LM head", in_dim=width)
    final_parent, final_attr = _parent_attr(base, stack.spec.final_norm)
    norms.append(_NormSite(final_parent, final_attr, stack.final_norm, [final_reader]))

    writers += [_linear(base, p, "the embeddings", out_dim=width) for p in spec.base_writers if _submodule(base, p)]
    embeds = []
    for path in spec.embeds:
        embed = _require(base, path, "the embeddings")
        if not isinstance(embed, nn.Embedding):
            raise DepthprobeError(f"{path} is a {type(embed).__name__}, expected nn.Embedding; cannot convert")
        if embed.embedding_dim == width:  # narrower ones reach the stream through a base writer
            embeds.append(embed)
    return _Plan(width, norms, writers, embeds)


def _refusal(model: nn.Module, stack: LayerStack) -> str:
    names = {type(m).__name__ for m in model.modules()}
    supported = ", ".join(sorted(k for k, f in FAMILIES.items() if f.stream is not None))
    if stack.norm_placement == "post":
        return f"{stack.family} is a Post-LN model: there is no Pre-RMSNorm equivalent; only Pre-LN models convert"
    if any("RMSNorm" in n for n in names) and not any(n == "LayerNorm" for n in names):
        return f"{stack.family} already uses RMSNorm; there is nothing to convert"
    return f"no Pre-LN conversion table for model family {stack.family!r}; supported: {supported}"


def _require(root: nn.Module, path: str, where: str) -> nn.Module:
    module = _submodule(root, path)
    if module is None:
        raise DepthprobeError(f"{where} has no {path}; this model does not match its family table, cannot convert")
    return module


def _parent_attr(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, attr = path.rpartition(".")
    return (root.get_submodule(parent) if parent else root), attr


def _norm_width(norm: nn.Module, where: str) -> int:
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        raise DepthprobeError(f"{where} is a {type(norm).__name__}, not a LayerNorm over the last dim; cannot convert")
    return norm.normalized_shape[0]


def _linear(root: nn.Module, path: str, where: str, *, in_dim: int | None = None, out_dim: int | None = None):
    module = _require(root, path, where)
    _check_linear(module, f"{where} {path}", in_dim=in_dim, out_dim=out_dim)
    return module


def _check_linear(module: nn.Module, where: str, *, in_dim: int | None = None, out_dim: int | None = None) -> None:
    if not isinstance(module, (nn.Linear, Conv1D)):
        raise DepthprobeError(f"{where} is a {type(module).__name__}, expected a linear layer; cannot convert")
    weight, _ = _get_affine(module)
    if (in_dim is not None and weight.shape[1] != in_dim) or (out_dim is not None and weight.shape[0] != out_dim):
        raise DepthprobeError(f"{where} has shape {tuple(weight.shape)}, which does not fit a stream of width "
                              f"{in_dim or out_dim}; cannot convert")


# ---------------------------------------------------------------------------- tensors
def _norm_affine(norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Gain and bias of a LayerNorm in float64 (1 and 0 when it has none)."""
    d = norm.normalized_shape[0]
    device = next((p.device for p in norm.parameters()), torch.device("cpu"))
    gain = norm.weight.detach().double() if norm.weight is not None else torch.ones(d, dtype=torch.float64)
    bias = norm.bias.detach().double() if norm.bias is not None else torch.zeros(d, dtype=torch.float64)
    return gain.to(device), bias.to(device)


def _get_affine(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W, c)`` in float64 with ``y = W x + c``, ``W`` of shape ``(out, in)`` (Conv1D transposed)."""
    weight = module.weight.detach().double()
    bias = module.bias.detach().double() if module.bias is not None else None
    return (weight.T if isinstance(module, Conv1D) else weight), bias


def _set_affine(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Store ``(W, c)`` (``W`` as ``(out, in)``) back into a Linear or Conv1D, fixing its sizes."""
    out_dim, in_dim = weight.shape
    if isinstance(module, Conv1D):
        _set_param(module, "weight", weight.T)
        module.nx, module.nf = in_dim, out_dim
    else:
        _set_param(module, "weight", weight)
        module.in_features, module.out_features = in_dim, out_dim
    if bias is not None:
        _set_param(module, "bias", bias)


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name, None)
    ref = old if old is not None else module.weight
    param = nn.Parameter(value.to(ref.dtype).contiguous(), requires_grad=ref.requires_grad)
    setattr(module, name, param)


def _untie_head(model: nn.Module) -> None:
    """Give the LM head its own weight: the embedding is about to be centered, the head not."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is None or embed is None or head.weight.data_ptr() != embed.weight.data_ptr():
        return
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text_config is not None and text_config is not model.config:
        text_config.tie_word_embeddings = False


def _swap_norms(plan: _Plan, to: str) -> None:
    for site in plan.norms:
        setattr(site.parent, site.attr, NORMS[to](site.norm.normalized_shape[0], site.norm.eps))
