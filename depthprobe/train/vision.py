"""The trainer of the small residual CNN (:mod:`depthprobe.model.vision_net`, re-exported here).

Training: AdamW with warmup and cosine decay (:func:`depthprobe.train.trainer.lr_factor`),
cross-entropy for classes or mean per-attribute BCE. ``out_dir`` gets ``checkpoint.pt``
(model, optimizer, step, RNG state; written atomically every ``ckpt_every`` steps and at the
end; ``resume=True`` continues from it), ``metrics.csv`` (``step, train_loss, lr,
grad_norm`` and ``grad_norm.{l}`` per block) and ``model.pt`` (config + weights, loadable
with :func:`load_vision_net` and ``depthprobe analyze DIR/model.pt --images ...``).

Example:
    >>> net = VisionNet(VisionNetConfig(num_outputs=10, in_channels=1))
    >>> train_vision(net, load_images("digits", image_size=16), VisionTrainConfig(steps=200))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from depthprobe import safeio
from depthprobe.errors import DepthprobeError
from depthprobe.images import ImageSet
from depthprobe.model.vision_net import (
    MODEL_FILE,
    ResidualBlock,
    VisionNet,
    VisionNetConfig,
    load_vision_net,
    save_vision_net,
    transfer_weights,
)
from depthprobe.train.trainer import lr_factor

__all__ = ["MODEL_FILE", "ResidualBlock", "VisionNet", "VisionNetConfig", "VisionTrainConfig", "evaluate_vision",
           "load_vision_net", "save_vision_net", "train_vision", "transfer_weights"]

CHECKPOINT, METRICS_CSV = "checkpoint.pt", "metrics.csv"


@dataclass(frozen=True)
class VisionTrainConfig:
    """How to train a :class:`VisionNet`; saved in every checkpoint."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    min_lr_ratio: float = 0.05
    seed: int = 0  # fixes the initial weights (when built after seeding) and the batch order
    log_every: int = 10  # per-block gradient norms every k steps
    ckpt_every: int = 100


def objective_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (integer class targets) or mean per-attribute BCE ({0, 1} float targets)."""
    if targets.dtype.is_floating_point:
        return F.binary_cross_entropy_with_logits(logits, targets)
    return F.cross_entropy(logits, targets)


def train_vision(model: VisionNet, data: ImageSet, config: VisionTrainConfig, out_dir: str | Path | None = None,
                 resume: bool = False, progress: bool = False) -> pd.DataFrame:
    """Train ``model`` in place on ``data``; the per-step records (also ``metrics.csv``)."""
    out = Path(out_dir) if out_dir is not None else None
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    records, start = [], 0
    if resume and out is not None and (out / CHECKPOINT).is_file():
        state = safeio.load_checkpoint(out / CHECKPOINT)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        start, records = int(state["step"]), pd.read_csv(out / METRICS_CSV).to_dict("records")
    targets = data.targets
    model.train()
    for step in tqdm(range(start, config.steps), desc="train", disable=not progress, initial=start,
                     total=config.steps):
        for group in opt.param_groups:
            group["lr"] = config.lr * lr_factor(step, config)
        index = torch.randint(len(data), (config.batch_size,), generator=gen)
        loss = objective_loss(model(data.pixels[index]), targets[index])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        records.append(_step_record(model, step + 1, float(loss.detach()), opt.param_groups[0]["lr"],
                                    (step + 1) % config.log_every == 0 or step == 0))
        if not math.isfinite(records[-1]["train_loss"]):
            raise DepthprobeError(f"training diverged at step {step + 1} (loss {records[-1]['train_loss']}); lower the lr")
        opt.step()
        if out is not None and ((step + 1) % config.ckpt_every == 0 or step + 1 == config.steps):
            _checkpoint(out, model, opt, gen, step + 1, records)
    model.eval()
    if out is not None:
        save_vision_net(model, out / MODEL_FILE)
    return pd.DataFrame(records)


def _step_record(model: VisionNet, step: int, loss: float, lr: float, per_block: bool) -> dict:
    grads = [p.grad.detach().pow(2).sum() for p in model.parameters() if p.grad is not None]
    record = {"step": step, "train_loss": loss, "lr": lr, "grad_norm": float(torch.stack(grads).sum().sqrt())}
    if per_block:
        for i, block in enumerate(model.blocks):
            g = [p.grad.detach().pow(2).sum() for p in block.parameters() if p.grad is not None]
            record[f"grad_norm.{i}"] = float(torch.stack(g).sum().sqrt()) if g else math.nan
    return record


def _checkpoint(out: Path, model, opt, gen: torch.Generator, step: int, records: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    safeio.atomic_to_csv(pd.DataFrame(records), out / METRICS_CSV, index=False)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(), "step": step}
    safeio.atomic_write(out / CHECKPOINT, lambda p: torch.save(state, p))


@torch.no_grad()
def evaluate_vision(model: nn.Module, data: ImageSet, batch_size: int = 256) -> dict[str, float]:
    """Held-out accuracy: of the argmax class, or per attribute (``acc.{name}``) and their mean."""
    model.eval()
    logits = torch.cat([model(data.pixels[i:i + batch_size]) for i in range(0, len(data), batch_size)])
    if data.multilabel:
        per = ((logits > 0).float() == data.attributes).float().mean(0)
        return {"accuracy": float(per.mean()), **{f"acc.{n}": float(v) for n, v in zip(data.names, per, strict=True)}}
    return {"accuracy": float((logits.argmax(1) == data.labels).float().mean())}
