"""Per-block measurements of an image classifier: one hooked pass, then drop and lens sweeps.

Each **spatial position** of a feature map ``(B, C, H, W)`` is a token with a C-dim vector
(a ViT's ``(B, T, d)`` tokens are tokens as they are, CLS included); every average below runs
over all positions of all images:

- ``angular_distance`` = mean arccos(cos(r_l, x_{l+1}))/π and ``block_influence`` = 1 − mean
  cos(r_l, x_{l+1}), where r_l = x_l, or, for a block that changes the map's shape, x_l
  mapped by the block's own shortcut (its 1x1 projection): the change the block makes
  relative to skipping it;
- ``activation_variance``: population variance over channels per position, then the mean;
  ``activation_rms``, ``max_abs_activation`` of x_{l+1};
- ``grad_norm``: L2 norm of the gradients of block l's parameters for the mean objective
  over all images (cross-entropy of the class, or BCE averaged over attributes);
- ``drop_delta_loss`` / ``drop_delta_error``: the objective / error rate with block l
  replaced by its shortcut minus the full model's (Veit et al.'s lesion);
- ``logit_lens_loss``: the objective when x_{l+1} goes straight to the model's own pooling,
  final norm and head (later blocks skipped), where no later block changes the shape.

The pass also keeps each block's features pooled per image (mean over positions), which
the linear probes (:mod:`depthprobe.probes.linear_probe`) read.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from depthprobe.hooking import hooked_all
from depthprobe.images import ImageSet
from depthprobe.model.vision import VisionStack
from depthprobe.probes import metrics as M
from depthprobe.probes.batch import Batch, batches_of
from depthprobe.probes.objective import Objective, objective_for, register_objective

__all__ = ["ImageObjective", "image_objective", "VisionPass", "drop_columns", "lens_column", "run_vision_pass", "stream_positions"]


@dataclass
class ImageObjective(Objective):
    """The engine's objective for image classifiers: mean cross-entropy of the class, or mean
    per-attribute BCE (float {0, 1} targets), per image. Registered for every
    :class:`~depthprobe.model.vision.VisionStack` (:func:`objective_for`)."""

    multilabel: bool = False

    @property
    def lm(self) -> bool:
        return False

    @property
    def name(self) -> str:
        return "attribute_bce" if self.multilabel else "cross_entropy"

    @property
    def device(self) -> torch.device:
        return self.stack.device

    def forward(self, batch: Batch, head: bool = True):
        return self.stack.logits(batch.inputs["pixel_values"])

    def logits(self, out) -> torch.Tensor:
        return out

    def tokens(self, batch: Batch) -> int:
        return batch.size

    def predictions(self, batch: Batch) -> int:
        return batch.size

    def image_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-image loss ``(B,)`` (graph kept): CE of the class, or BCE averaged over attributes."""
        if targets.dtype.is_floating_point:
            return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none").mean(1)
        return F.cross_entropy(logits.float(), targets, reduction="none")

    def loss_sum(self, out, batch: Batch) -> tuple[torch.Tensor, int]:
        return self.image_losses(out, batch.targets).sum(), batch.size

    def window_scores(self, out, batch: Batch, reference=None) -> np.ndarray:
        return self.image_losses(out, batch.targets).detach().double().cpu().numpy()

    def error_sum(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        """sum over images of the error: argmax wrong (0/1), or the share of attributes wrong."""
        if targets.dtype.is_floating_point:
            return float(((logits > 0).float() != targets).float().mean(1).sum())
        return float((logits.argmax(-1) != targets).sum())


register_objective(lambda stack: isinstance(stack, VisionStack), ImageObjective)


def image_objective(stack: VisionStack, images: ImageSet) -> ImageObjective:
    """The registered objective of ``stack``, told whether the targets are attributes."""
    objective = objective_for(stack)
    objective.multilabel = images.multilabel
    return objective


def stream_positions(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A block state as ``(..., C)`` token vectors: a map's channels last, a ViT's as is."""
    return x.movedim(1, -1) if layout == "maps" and x.ndim == 4 else x


def pooled(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Per image, the mean over positions (tokens): ``(B, C)``."""
    t = stream_positions(x, layout)
    return t.reshape(t.shape[0], -1, t.shape[-1]).mean(1)


@dataclass
class VisionPass:
    """What the hooked pass measured: per-block columns, the base objective, pooled features."""

    columns: dict[str, list[float]]
    base_loss: float
    base_error: float
    features: list[np.ndarray] = field(default_factory=list)  # per block (N, C), when kept


def _batches(images: ImageSet, batch_size: int, objective: ImageObjective, desc: str, progress: bool):
    """The engine's batches of the images (``pixel_values`` in, labels as targets), placed."""
    for batch in tqdm(batches_of(images, batch_size), desc=desc, disable=not progress, leave=False):
        yield objective.place(batch)


class _Sums:
    """Streaming per-block sums (never every activation)."""

    def __init__(self, n: int):
        self.ang, self.cos, self.var, self.rms = (np.zeros(n) for _ in range(4))
        self.max, self.count = np.zeros(n), np.zeros(n)

    def add(self, i: int, ref: torch.Tensor | None, out: torch.Tensor) -> None:
        if ref is not None:
            self.ang[i] += M.angular_sum(ref, out)
            self.cos[i] += M.cosine_sum(ref, out)
        else:
            self.ang[i] = self.cos[i] = math.nan
        self.var[i] += M.variance_sum(out)
        self.rms[i] += M.rms_sum(out)
        self.max[i] = max(self.max[i], M.max_abs(out))
        self.count[i] += M.tokens(out).shape[0]


def _reference(block, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
    """x_l, or its shortcut's image where the block changes the shape (None without one)."""
    if x.shape == out.shape:
        return x
    return block.shortcut(x) if block.shortcut is not None else None


def run_vision_pass(stack: VisionStack, images: ImageSet, metrics: Sequence[str], batch_size: int = 64,
                    progress: bool = True, keep_features: bool = False) -> VisionPass:
    """One forward (+ backward for ``grad``) over all images with every block hooked."""
    n, layout = len(stack), stack.layout
    sums, feats = _Sums(n), [[] for _ in range(n)]
    objective = image_objective(stack, images)

    def hook(module, args, kwargs, output, i):
        x = (args[0] if args else kwargs["hidden_states"]).detach()
        out = (output[0] if isinstance(output, (tuple, list)) else output).detach()
        with torch.no_grad():
            ref = _reference(stack.blocks[i], x, out)
            sums.add(i, None if ref is None else stream_positions(ref, layout), stream_positions(out, layout))
            if keep_features:
                feats[i].append(pooled(out, layout).float().cpu().numpy())

    grad = "grad" in metrics
    hooks = [(b.module, lambda m, a, k, o, i=i: hook(m, a, k, o, i)) for i, b in enumerate(stack.blocks)]
    loss_sum = err_sum = 0.0
    with hooked_all(hooks, with_kwargs=True):
        stack.model.zero_grad(set_to_none=True)
        for batch in _batches(images, batch_size, objective, "vision pass", progress):
            with torch.set_grad_enabled(grad):
                logits = objective.forward(batch)
                loss, _ = objective.loss_sum(logits, batch)
            if grad:
                (loss / len(images)).backward()  # accumulates the gradient of the mean over all images
            loss_sum += float(loss.detach())
            err_sum += objective.error_sum(logits.detach(), batch.targets)
    count = np.maximum(sums.count, 1)
    columns = {"angular_distance": list(sums.ang / count), "block_influence": list(1 - sums.cos / count),
               "activation_variance": list(sums.var / count), "activation_rms": list(sums.rms / count),
               "max_abs_activation": list(sums.max)}
    if grad:
        columns["grad_norm"] = [M.grad_l2(list(b.module.parameters())) for b in stack.blocks]
        stack.model.zero_grad(set_to_none=True)
    return VisionPass(columns, loss_sum / len(images), err_sum / len(images),
                      [np.concatenate(f) for f in feats] if keep_features else [])


@torch.no_grad()
def _score(stack: VisionStack, images: ImageSet, batch_size: int, context, desc: str = "",
           progress: bool = False) -> tuple[float, float]:
    """Mean objective and error over ``images`` with ``context`` (a lesion) active."""
    objective = image_objective(stack, images)
    loss = err = 0.0
    with context:
        for batch in _batches(images, batch_size, objective, desc, progress):
            logits = objective.forward(batch)
            loss += float(objective.loss_sum(logits, batch)[0])
            err += objective.error_sum(logits, batch.targets)
    return loss / len(images), err / len(images)


def drop_columns(stack: VisionStack, images: ImageSet, base: VisionPass, batch_size: int = 64,
                 progress: bool = True) -> dict[str, list[float]]:
    """Per block: objective and error with the block replaced by its shortcut, minus the full model's."""
    stack.trace()
    loss, err = [], []
    for i in tqdm(range(len(stack)), desc="drop", disable=not progress):
        if stack.blocks[i].shortcut is None:
            loss.append(math.nan)
            err.append(math.nan)
            continue
        lo, er = _score(stack, images, batch_size, stack.skip(i))
        loss.append(lo - base.base_loss)
        err.append(er - base.base_error)
    return {"drop_delta_loss": loss, "drop_delta_error": err}


def lens_column(stack: VisionStack, images: ImageSet, batch_size: int = 64, progress: bool = True) -> list[float]:
    """Per block: the objective with every later block skipped (NaN where a later block changes the shape)."""
    out = []
    for i in tqdm(range(len(stack)), desc="lens", disable=not progress):
        later = stack.lens_blocks(i)
        if later is None:
            out.append(math.nan)
            continue
        context = stack.replace_outputs(later) if later else contextlib.nullcontext()
        out.append(_score(stack, images, batch_size, context)[0])
    return out
