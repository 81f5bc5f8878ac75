"""The tuned lens (Belrose et al., 2023): one affine translator per block, saved in tuned-lens's
own format, and the per-layer readouts that score it beside the logit lens.

Translator ``i`` reads the residual stream *entering* block ``i`` (tuned-lens's
``hidden_states[i]``: ``i = 0`` is the embedding output x_0, ``i`` the output x_i of block
i-1) and maps it to ``h + A_i h + b_i`` (A, b initialised at zero: the lens starts as the
logit lens). Its logits are the model's final norm and head on that state. depthprobe's
``layer`` l is block l's output x_{l+1}, read by translator l+1; the last block's output is
the model's own final state, read as is (no translator, KL 0).

Folder format (tuned-lens 0.2, ``TunedLens.from_model_and_pretrained(model, DIR)`` loads it):
``config.json`` (``base_model_name_or_path``, ``d_model``, ``num_hidden_layers``, ``bias``,
``base_model_revision``, ``unembed_hash``, ``lens_type``) and ``params.pt`` (the translators'
state dict, keys ``"{i}.weight"``, ``"{i}.bias"``). depthprobe adds ``lens_training.json``
(which text, which tokens and what budget trained it) and ``lens_train.csv`` (loss per step).

Per layer, over every position t (``KL(final || lens)`` in nats, tuned-lens's training loss):
``logit_lens_kl = mean_t sum_v p_t(v) (log p_t(v) - log q_t(v))``, p the model's final
distribution, q the logit lens's; ``tuned_lens_kl`` the same with the tuned lens;
``tuned_lens_loss`` the next-token loss of the tuned lens's logits (as ``logit_lens_loss``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from depthprobe.errors import DepthprobeError
from depthprobe.model.stack import LayerStack

CONFIG = "config.json"
PARAMS = "params.pt"
TRAINING = "lens_training.json"
TRAIN_CSV = "lens_train.csv"


class TunedLens(nn.Module):
    """``num_layers`` affine translators of width ``d_model``, zero-initialised."""

    def __init__(self, d_model: int, num_layers: int, bias: bool = True):
        super().__init__()
        self.translators = nn.ModuleList(nn.Linear(d_model, d_model, bias=bias) for _ in range(num_layers))
        for t in self.translators:
            nn.init.zeros_(t.weight)
            if t.bias is not None:
                nn.init.zeros_(t.bias)

    @property
    def d_model(self) -> int:
        return self.translators[0].in_features

    def transform(self, hidden: torch.Tensor, index: int) -> torch.Tensor:
        """``h + A_index h + b_index`` (in the translators' dtype, back to ``hidden``'s)."""
        t = self.translators[index]
        h = hidden.to(t.weight.dtype)
        return (h + t(h)).to(hidden.dtype)

    def for_layer(self, layer: int) -> int | None:
        """The translator that reads depthprobe ``layer`` (block l's output): l + 1, or None
        for the last block (its output is the model's own final state)."""
        return layer + 1 if layer + 1 < len(self.translators) else None


def unembed_hash(stack: LayerStack) -> str | None:
    """tuned-lens's ``unembedding_hash``: sha256 of numpy's 1-decimal print of the head's weight."""
    weight = getattr(stack.head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.device.type == "meta":
        return None
    return hashlib.sha256(str.encode(np.array_str(weight.detach().cpu().float().numpy(), precision=1))).hexdigest()


def new_lens(stack: LayerStack) -> TunedLens:
    """A zero lens for ``stack``'s model on its device, float32."""
    d_model = int(stack.head.in_features if isinstance(stack.head, nn.Linear) else stack.model.config.hidden_size)
    return TunedLens(d_model, len(stack)).to(stack.device)


def save_lens(lens: TunedLens, folder: str | Path, stack: LayerStack, training: dict | None = None) -> Path:
    """Write ``config.json`` and ``params.pt`` (tuned-lens's format) and ``lens_training.json``."""
    from depthprobe import safeio

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = getattr(stack.model, "config", None)
    meta = {"base_model_name_or_path": str(getattr(config, "_name_or_path", "") or type(stack.model).__name__),
            "d_model": lens.d_model, "num_hidden_layers": len(lens.translators),
            "bias": lens.translators[0].bias is not None, "base_model_revision": None,
            "unembed_hash": unembed_hash(stack), "lens_type": "linear_tuned_lens"}
    state = {k: v.detach().cpu().contiguous() for k, v in lens.translators.state_dict().items()}
    safeio.atomic_write(folder / PARAMS, lambda p: torch.save(state, p))
    safeio.atomic_write_text(folder / CONFIG, json.dumps(meta, indent=1))
    if training is not None:
        safeio.atomic_write_text(folder / TRAINING, json.dumps(training, indent=1))
    return folder


def load_lens(folder: str | Path, stack: LayerStack) -> tuple[TunedLens, dict]:
    """A lens saved by depthprobe or by tuned-lens (``TunedLens.save``), checked against the
    model; and what trained it (``lens_training.json``, empty for a tuned-lens folder)."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / PARAMS).is_file():
        raise DepthprobeError(f"--lens {folder}: no {CONFIG} and {PARAMS} there; train one with "
                              "`depthprobe lens train MODEL --out DIR` or give a tuned-lens folder")
    try:
        meta = json.loads((folder / CONFIG).read_text())
        state = torch.load(folder / PARAMS, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise DepthprobeError(f"--lens {folder}: cannot read it ({type(exc).__name__}: {exc})") from exc
    if meta.get("lens_type", "linear_tuned_lens") != "linear_tuned_lens":
        raise DepthprobeError(f"--lens {folder}: lens_type {meta.get('lens_type')!r} is not a linear tuned lens")
    lens = new_lens(stack)
    if int(meta.get("d_model", -1)) != lens.d_model or int(meta.get("num_hidden_layers", -1)) != len(stack):
        raise DepthprobeError(f"--lens {folder} was made for d_model={meta.get('d_model')}, "
                              f"{meta.get('num_hidden_layers')} layers; this model has d_model={lens.d_model}, "
                              f"{len(stack)} blocks: train a lens for this model")
    if not meta.get("bias", True):
        for t in lens.translators:
            t.bias = None
    try:
        lens.translators.load_state_dict(state)
    except RuntimeError as exc:
        raise DepthprobeError(f"--lens {folder}: its {PARAMS} does not fit ({str(exc).splitlines()[0]})") from exc
    training = json.loads((folder / TRAINING).read_text()) if (folder / TRAINING).is_file() else {}
    return lens.to(stack.device).eval(), training


def window_hashes(input_ids: torch.Tensor) -> list[str]:
    """A short sha1 of each window's token ids (for the held-out check)."""
    return [hashlib.sha1(row.cpu().numpy().astype(np.int64).tobytes()).hexdigest()[:16] for row in input_ids]


def check_heldout(training: dict, input_ids: torch.Tensor, source: str) -> None:
    """Refuse to score a lens on the text that trained it: the same source's tokens (the
    scored windows are the first ``N*T`` tokens of ``source``) or identical windows."""
    text = training.get("text") or {}
    n_tokens = int(input_ids.numel())
    if text.get("source") and _same_source(text["source"], source) and n_tokens > int(text.get("token_start", 0)):
        raise DepthprobeError(
            f"the lens was trained on tokens {text.get('token_start')}..{text.get('token_end')} of {source}; these "
            f"windows are its tokens 0..{n_tokens}: score it on other text (--text-file) or fewer tokens")
    seen = set(text.get("window_hashes", []))
    if seen and seen.intersection(window_hashes(input_ids)):
        raise DepthprobeError("some of these windows trained the lens (same token ids): score it on held-out text")


def _same_source(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve() and Path(a).is_file()
    except OSError:
        return False


def kl_sum(final_logp: torch.Tensor, logits: torch.Tensor) -> float:
    """sum over positions of KL(p || q) = sum_v p (log p - log q), ``(B, T, V)`` each, float64 sum."""
    logq = F.log_softmax(logits.float(), dim=-1)
    return float((final_logp.exp() * (final_logp - logq)).sum(-1).double().sum())


@dataclass
class ReadoutSums:
    """Per-layer sums of the lens readouts over the windows (divided once at the end)."""

    logit_kl: np.ndarray
    tuned_kl: np.ndarray
    tuned_nll: np.ndarray
    logit_nll: np.ndarray
    positions: int = 0
    predictions: int = 0

    @classmethod
    def zeros(cls, num_layers: int) -> ReadoutSums:
        return cls(*(np.zeros(num_layers) for _ in range(4)))

    def reduced(self) -> ReadoutSums:
        """Summed over torchrun's processes (each scored its own windows)."""
        from depthprobe import distributed

        arrays = [distributed.reduce_sum(a) for a in (self.logit_kl, self.tuned_kl, self.tuned_nll, self.logit_nll)]
        counts = [int(distributed.reduce_sum(float(c))) for c in (self.positions, self.predictions)]
        return ReadoutSums(*arrays, *counts)

    def columns(self, with_logit_loss: bool) -> dict[str, list[float]]:
        out = {"logit_lens_kl": list(self.logit_kl / self.positions),
               "tuned_lens_loss": list(self.tuned_nll / self.predictions),
               "tuned_lens_kl": list(self.tuned_kl / self.positions)}
        return {"logit_lens_loss": list(self.logit_nll / self.predictions), **out} if with_logit_loss else out
