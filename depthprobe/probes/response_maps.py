"""Response maps of CNN blocks, scored against ground-truth boxes (Liu et al. 2015, claim 2).

The map of block l is gradient-weighted (Grad-CAM, Selvaraju et al. 2017):
``M = relu(sum_c w_c A_c)`` with ``w_c`` the spatial mean of ``d s / d A_c``, A the block's
output ``(C, H, W)`` and s the score: the true class's logit, or the sum of all attribute
logits (the net's response to the attributes together, as LNet averages its attribute
filters). For a net that ends in global average pooling and a linear head, the last block's
Grad-CAM is its class activation map (CAM) up to a positive factor.

Scores over images, with the map bilinearly upsampled to the image:

- ``pointing_accuracy``: the map's maximum lies inside the box;
- ``response_iou``: IoU of {map >= 0.5 max} with the box.

Baselines: ``centre`` (the image centre as the point; a box of the mean box size at the
centre as the mask) and ``random`` (a uniform random point; that box at a uniform random
place; seed 0).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from depthprobe.hooking import hooked
from depthprobe.images import ImageSet
from depthprobe.model.vision import VisionStack

__all__ = ["IOU_THRESHOLD", "baseline_scores", "grad_cam", "localization_scores", "response_maps"]

IOU_THRESHOLD = 0.5  # of the map's maximum


def grad_cam(stack: VisionStack, pixels: torch.Tensor, targets: torch.Tensor, layer: int) -> torch.Tensor:
    """Grad-CAM of block ``layer`` for a batch: ``(B, H, W)`` (non-negative)."""
    kept = {}

    def hook(module, args, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        out.retain_grad()
        kept["a"] = out

    with hooked(stack.blocks[layer].module, post=hook, with_kwargs=False), torch.enable_grad():
        logits = stack.logits(pixels)
        score = logits.sum() if targets.dtype.is_floating_point else logits.gather(1, targets[:, None]).sum()
        grad = torch.autograd.grad(score, kept["a"])[0]
    a = kept["a"].detach()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    return F.relu((weights * a).sum(1))


def response_maps(stack: VisionStack, images: ImageSet, layers: list[int], batch_size: int = 64) -> dict[int, torch.Tensor]:
    """Per layer, the maps of every image ``(N, H_l, W_l)``."""
    out: dict[int, list] = {layer: [] for layer in layers}
    for i in range(0, len(images), batch_size):
        pixels = images.pixels[i:i + batch_size].to(stack.device)
        targets = images.targets[i:i + batch_size].to(stack.device)
        for layer in layers:
            out[layer].append(grad_cam(stack, pixels, targets, layer).cpu())
    return {layer: torch.cat(maps) for layer, maps in out.items()}


def _box_mask(box: torch.Tensor, size: int) -> torch.Tensor:
    x, y, w, h = box.tolist()
    grid = torch.arange(size) + 0.5
    inside_x = (grid >= x) & (grid <= x + w)
    inside_y = (grid >= y) & (grid <= y + h)
    return inside_y[:, None] & inside_x[None, :]


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def localization_scores(maps: torch.Tensor, boxes: torch.Tensor, image_size: int) -> dict[str, float]:
    """Mean pointing accuracy and IoU of ``maps`` ``(N, H, W)`` against ``boxes`` ``(N, 4)``."""
    up = F.interpolate(maps[:, None].float(), size=(image_size, image_size), mode="bilinear",
                       align_corners=False)[:, 0]
    hits, ious = [], []
    for m, box in zip(up, boxes, strict=True):
        mask = _box_mask(box, image_size)
        peak = int(m.argmax())
        hits.append(bool(mask.flatten()[peak]))
        top = float(m.max())
        ious.append(_iou(m >= IOU_THRESHOLD * top, mask) if top > 0 else 0.0)
    return {"pointing_accuracy": float(np.mean(hits)), "response_iou": float(np.mean(ious))}


def baseline_scores(boxes: torch.Tensor, image_size: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """The centre and random baselines' pointing accuracy and IoU (see the module docstring)."""
    rng = np.random.default_rng(seed)
    w, h = boxes[:, 2].mean().item(), boxes[:, 3].mean().item()
    centre_box = torch.tensor([(image_size - w) / 2, (image_size - h) / 2, w, h])
    result = {}
    for name in ("centre", "random"):
        hits, ious = [], []
        for box in boxes:
            mask = _box_mask(box, image_size)
            if name == "centre":
                px = py = image_size // 2
                guess = centre_box
            else:
                px, py = (int(v) for v in rng.integers(0, image_size, size=2))
                guess = torch.tensor([rng.uniform(0, image_size - w), rng.uniform(0, image_size - h), w, h])
            hits.append(bool(mask[py, px]))
            ious.append(_iou(_box_mask(guess, image_size), mask))
        result[name] = {"pointing_accuracy": float(np.mean(hits)), "response_iou": float(np.mean(ious))}
    return result
