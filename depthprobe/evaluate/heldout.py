"""Scoring a (pruned) model on held-out windows, with bootstrap intervals over windows.

A loss measured on the windows that chose the layers is biased toward the pruned model;
every pruning paper reports perplexity on other text. Here each window's mean next-token
NLL is computed with the model's own forward (blocks removed by ``LayerStack.keep_blocks``,
exactly the computation the exported model does), and the mean over windows gets a
percentile bootstrap interval (windows resampled with replacement, ``depthprobe.stats``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from depthprobe.data import Windows
from depthprobe.model.stack import LayerStack
from depthprobe.probes.metrics import per_sequence_nll
from depthprobe.probes.scoring import WindowScorer
from depthprobe.stats import DEFAULT_BOOT, DEFAULT_LEVEL, bootstrap_indices, percentile_interval

log = logging.getLogger(__name__)


def window_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> np.ndarray:
    """Mean next-token NLL of each window: ``-1/(T-1) Σ_t log p(x_{t+1} | x_≤t)``,
    ``(B, T, V), (B, T) -> (B,)`` float64 (:func:`depthprobe.probes.metrics.per_sequence_nll`)."""
    return per_sequence_nll(logits, input_ids).cpu().numpy()


def per_window_loss(stack: LayerStack, windows: Windows | torch.Tensor, removed: Sequence[int] = (),
                    batch_size: int = 4) -> np.ndarray:
    """Each window's mean next-token NLL of the model without blocks ``removed`` ``-> (N,)``
    (:class:`~depthprobe.probes.scoring.WindowScorer`, the scorer pruning uses too)."""
    return WindowScorer(stack, windows, batch_size).scores(removed)


def heldout_loss(model: nn.Module | LayerStack, windows: Windows | torch.Tensor, removed: Sequence[int] = (),
                 batch_size: int = 4) -> float:
    """Mean over windows of :func:`per_window_loss`: the one held-out loss of depthprobe (the
    prune curve, the repair curve, the repaired and healed exports all use it)."""
    stack = model if isinstance(model, LayerStack) else LayerStack.from_model(model)
    return float(per_window_loss(stack, windows, removed, batch_size).mean())


def mean_interval(values: np.ndarray, n_boot: int = DEFAULT_BOOT, level: float = DEFAULT_LEVEL,
                  seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-window values and its percentile bootstrap interval over windows."""
    values = np.asarray(values, float)
    means = values[bootstrap_indices(len(values), n_boot, seed)].mean(1)
    lo, hi = percentile_interval(means, level)
    return float(values.mean()), float(lo), float(hi)


@dataclass
class HeldoutScore:
    """Mean loss on calibration and held-out windows of one set of removed blocks."""

    removed: list[int]
    loss: float
    loss_low: float
    loss_high: float
    heldout_loss: float
    heldout_loss_low: float
    heldout_loss_high: float

    @property
    def heldout_perplexity(self) -> float:
        return math.exp(self.heldout_loss)


def score_removals(stack: LayerStack, calibration: Windows, heldout: Windows, removals: Sequence[Sequence[int]],
                   batch_size: int = 4, progress: bool = True) -> dict[tuple[int, ...], HeldoutScore]:
    """Calibration and held-out loss (with intervals) of each distinct set in ``removals``."""
    distinct = list(dict.fromkeys(tuple(sorted(r)) for r in removals))
    scores = {}
    for removed in tqdm(distinct, desc="held-out loss", disable=not progress, leave=False):
        cal = mean_interval(per_window_loss(stack, calibration, removed, batch_size))
        held = mean_interval(per_window_loss(stack, heldout, removed, batch_size))
        scores[removed] = HeldoutScore(list(removed), *cal, *held)
    return scores


def _parse_removed(text) -> tuple[int, ...]:
    if isinstance(text, float) or text is None or str(text) == "":
        return ()
    return tuple(sorted(int(v) for v in str(text).split(";") if v != ""))


def add_heldout_columns(curve: pd.DataFrame, scores: dict[tuple[int, ...], HeldoutScore]) -> pd.DataFrame:
    """``prune_curve`` with calibration intervals and held-out loss side by side.

    Adds ``loss_low``, ``loss_high`` (calibration), ``heldout_loss``, ``heldout_loss_low``,
    ``heldout_loss_high``, ``heldout_perplexity``; the calibration ``loss`` stays the sweep's.
    """
    rows = [scores[_parse_removed(r)] for r in curve["removed"]]
    out = curve.copy()
    out["loss_low"] = [s.loss_low for s in rows]
    out["loss_high"] = [s.loss_high for s in rows]
    out["heldout_loss"] = [s.heldout_loss for s in rows]
    out["heldout_loss_low"] = [s.heldout_loss_low for s in rows]
    out["heldout_loss_high"] = [s.heldout_loss_high for s in rows]
    out["heldout_perplexity"] = [s.heldout_perplexity for s in rows]
    return out


def heldout_summary(before: HeldoutScore, after: HeldoutScore, heldout: Windows) -> dict:
    """The ``prune.json`` fields: held-out loss / perplexity before and after, with intervals."""
    return {
        "heldout_source": heldout.source,
        "heldout_tokens": int(heldout.input_ids.numel()),
        "heldout_loss_before": before.heldout_loss,
        "heldout_loss_before_interval": [before.heldout_loss_low, before.heldout_loss_high],
        "heldout_loss_after": after.heldout_loss,
        "heldout_loss_after_interval": [after.heldout_loss_low, after.heldout_loss_high],
        "heldout_perplexity_before": before.heldout_perplexity,
        "heldout_perplexity_after": after.heldout_perplexity,
        "loss_after_interval": [after.loss_low, after.loss_high],
    }
