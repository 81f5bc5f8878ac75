"""Saving a converted model, loading it back, and measuring that it gives the same logits.

A converted folder is an ordinary ``save_pretrained`` folder (same model class and config)
whose ``config.json`` carries ``depthprobe_norm: "rmsnorm" | "crmsnorm"``. Its state dict
differs from the original class's: the norms have no parameters, some linears gained a bias
(the folded LayerNorm bias), and after CRMSNorm the stream-facing tensors are ``d-1`` wide.
:func:`load_converted` (called by ``depthprobe.load_model`` when it sees the config key)
builds the model from its config, swaps in the norms, resizes the modules to the saved
tensors and loads them strictly. Plain ``transformers.from_pretrained`` does not know this
and would silently drop the added biases: load converted folders through depthprobe.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from depthprobe.convert.fold import CONFIG_KEY, _plan, _swap_norms
from depthprobe.convert.norms import NORMS
from depthprobe.errors import DepthprobeError
from depthprobe.safeio import atomic_save_pretrained

log = logging.getLogger(__name__)


def save_converted(model: nn.Module, tokenizer, out: str | Path) -> Path:
    """Write a converted model (and its tokenizer) to ``out``; reload with ``depthprobe.load_model``."""
    if getattr(model.config, CONFIG_KEY, None) not in NORMS:
        raise DepthprobeError("this model is not a converted one; run convert_to_rmsnorm / convert_to_crmsnorm first")
    # keys as named in the modules: load_converted reads them as is; files moved in only when complete
    return atomic_save_pretrained(out, model, tokenizer, save_original_format=False)


def load_converted(folder: str | Path, config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a converted model saved by :func:`save_converted` (strict: every tensor must fit)."""
    from transformers import AutoModelForCausalLM

    kind = getattr(config, CONFIG_KEY)
    if kind not in NORMS:
        raise DepthprobeError(f"{folder}: config.{CONFIG_KEY}={kind!r} is not one of {', '.join(NORMS)}")
    state = _read_state(Path(folder))
    setattr(config, CONFIG_KEY, None)  # the skeleton is an ordinary Pre-LN model until the swap
    try:
        model = AutoModelForCausalLM.from_config(config)
        plan = _plan(model)
    finally:
        setattr(config, CONFIG_KEY, kind)
    _swap_norms(plan, kind)
    _shape_like(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DepthprobeError(
            f"{folder} does not match its config ({len(missing)} missing, {len(unexpected)} unexpected tensors, "
            f"e.g. {(missing + unexpected)[0]}); was it written by `depthprobe convert`?"
        )
    return model.to(dtype).eval()


def _read_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise DepthprobeError(f"{folder} has no model.safetensors; re-run `depthprobe convert` to write it")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(folder / name)))
    return state


def _shape_like(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Resize parameters (and add missing biases) so ``model`` can hold ``state``."""
    params = dict(model.named_parameters())
    for key, tensor in state.items():
        if key in params and params[key].shape == tensor.shape:
            continue
        path, _, name = key.rpartition(".")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue  # left for load_state_dict to report
        if name not in ("weight", "bias") or not isinstance(module, (nn.Linear, Conv1D, nn.Embedding)):
            continue
        setattr(module, name, nn.Parameter(torch.empty(tensor.shape, dtype=tensor.dtype)))
        if isinstance(module, nn.Linear) and name == "weight":
            module.out_features, module.in_features = tensor.shape
        elif isinstance(module, Conv1D) and name == "weight":
            module.nx, module.nf = tensor.shape
        elif isinstance(module, nn.Embedding):
            module.embedding_dim = tensor.shape[1]


@dataclass(frozen=True)
class LogitDelta:
    """``max_abs = max |l_conv - l_orig|``; ``max_rel = max_abs / max |l_orig|`` over all tokens."""

    max_abs: float
    max_rel: float
    num_tokens: int


#: dtype -> ("abs" | "rel", limit) that a faithful conversion stays within (``depthprobe convert --check``)
TOLERANCES = {
    "float64": ("abs", 1e-10),
    "float32": ("rel", 1e-4),
    "bfloat16": ("rel", 5e-2),  # weights are rounded to 8 bits of mantissa after folding
    "float16": ("rel", 1e-2),
}


def tolerance(dtype: str | torch.dtype) -> tuple[str, float]:
    """The ``(kind, limit)`` a conversion in ``dtype`` must meet (kind: ``abs`` or ``rel``)."""
    name = str(dtype).removeprefix("torch.")
    if name not in TOLERANCES:
        raise DepthprobeError(f"no conversion tolerance for dtype {name}; use one of {', '.join(TOLERANCES)}")
    return TOLERANCES[name]


@torch.no_grad()
def logit_delta(reference: nn.Module, candidate: nn.Module, input_ids: torch.Tensor, batch_size: int = 4) -> LogitDelta:
    """Largest logit difference between two models on the same ``(N, T)`` token windows."""
    worst, scale = 0.0, 0.0
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start : start + batch_size]
        ref = reference(input_ids=ids.to(_device(reference))).logits.double()
        got = candidate(input_ids=ids.to(_device(candidate))).logits.double().to(ref.device)
        worst = max(worst, (got - ref).abs().max().item())
        scale = max(scale, ref.abs().max().item())
    return LogitDelta(worst, worst / scale if scale else 0.0, int(input_ids.numel()))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
