"""How one training run is set up and what it returns: :class:`TrainConfig` (saved in
``config.json`` and in every checkpoint), the learning-rate schedule, :class:`TrainResult` and
the columns of its tables."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from depthprobe.errors import DepthprobeError
from depthprobe.inputs import require_finite, require_positive_ints

CHECKPOINT = "checkpoint.pt"
METRIC_COLUMNS = ["step", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s"]
LAYER_COLUMNS = [
    "step", "layer", "grad_norm", "grad_norm_attn", "grad_norm_mlp", "activation_variance", "angular_distance",
]  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    """How to train; saved in ``config.json`` and in every checkpoint."""

    steps: int = 200  # optimizer steps
    batch_size: int = 16  # sequences per optimizer step, over all processes and accumulation
    grad_accum: int = 1  # micro-batches per optimizer step in each process
    seq_len: int = 128  # tokens per sequence
    lr: float = 1e-3  # peak learning rate (papers: 1e-3, 5e-4 from 350M up)
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    warmup_steps: int = 20  # linear warmup from lr/warmup_steps to lr
    weight_decay: float = 0.1  # AdamW, on matrices only (not norms)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient L2 norm; 0 disables clipping
    seed: int = 0  # fixes the initial weights and the order of training windows
    eval_every: int = 50  # validation loss every k steps (and at the end); 0: only at the end
    diag_every: int = 50  # per-layer diagnostics every k steps (and at step 1 and the end); 0: never
    ckpt_every: int = 100  # checkpoint every k steps (and at the end); 0: only at the end
    device: str = "auto"  # cpu, cuda, cuda:N, mps, auto
    precision: str = "auto"  # auto (bf16 autocast on GPUs that support it), bf16 or fp32

    def __post_init__(self):
        require_positive_ints(self, ("steps", "batch_size", "grad_accum", "seq_len"), flags=True)
        require_finite(self, ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip"), flags=True)
        for name in ("steps", "batch_size", "grad_accum", "seq_len"):
            if getattr(self, name) < 1:
                raise DepthprobeError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.seq_len < 2:
            raise DepthprobeError("--seq-len must be at least 2")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise DepthprobeError("--lr must be positive and --min-lr-ratio between 0 and 1")
        for name in ("warmup_steps", "eval_every", "diag_every", "ckpt_every"):
            if getattr(self, name) < 0:
                raise DepthprobeError(f"--{name.replace('_', '-')} must be 0 or more")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise DepthprobeError(f"--precision must be auto, bf16 or fp32 (got {self.precision!r})")


@dataclass
class TrainResult:
    """What a run produced (also in ``out_dir`` when one was given)."""

    steps_done: int
    diverged: bool
    final_val_loss: float
    metrics: pd.DataFrame  # one row per step, METRIC_COLUMNS
    layers: pd.DataFrame  # one row per (diagnostic step, layer), LAYER_COLUMNS
    seconds: float
    out_dir: Path | None = None

    @property
    def final_val_ppl(self) -> float:
        return math.exp(self.final_val_loss) if math.isfinite(self.final_val_loss) else math.nan


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the peak lr at 0-based ``step``: linear warmup, cosine to min_lr_ratio."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
