"""Choosing which blocks to remove, and the pruning curve of every strategy.

Strategies (K = number of blocks to remove):

- ``drop``: the K blocks with the smallest single-block ``drop_delta_loss``.
- ``greedy``: remove one block at a time, each time the one whose removal hurts least given
  the blocks already removed (re-measured after each removal, prefix cache reused).
- ``angular``: the K blocks with the smallest angular distance d(x_l, x_{l+1}).
- ``block-influence``: the K blocks with the smallest 1 − cos(x_l, x_{l+1}) (ShortGPT).
- ``block``: the contiguous run l..l+K−1 with the smallest d(x_l, x_{l+K}) (Gromov et al.).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from depthprobe.errors import MODEL_FORWARD_ERRORS, DepthprobeError, refused_by_model
from depthprobe.journal import Journal
from depthprobe.model.stack import LayerStack
from depthprobe.probes.drop import _fingerprint as sweep_fingerprint
from depthprobe.probes.scoring import BatchScorer, WindowScorer, capture_states

STRATEGIES = ("drop", "greedy", "angular", "block-influence", "block")
#: ranked strategies: the per-layer column whose smallest values are removed first
RANK_COLUMNS = {"drop": "drop_delta_loss", "angular": "angular_distance", "block-influence": "block_influence"}


def validate_removal(stack: LayerStack, remove: Sequence[int]) -> list[int]:
    """Check a user's ``--remove`` list: in range, no duplicates, at least one block kept."""
    remove = list(remove)
    if len(set(remove)) != len(remove):
        dupes = sorted({i for i in remove if remove.count(i) > 1})
        raise DepthprobeError(f"--remove lists layer(s) {dupes} more than once")
    remove = [stack.check_index(i) for i in remove]
    if len(set(remove)) >= len(stack):
        raise DepthprobeError(f"cannot remove all {len(stack)} blocks; keep at least one")
    return sorted(set(remove))


def validate_k(stack: LayerStack, k: int) -> int:
    if not 1 <= k < len(stack):
        raise DepthprobeError(f"--num-layers must be between 1 and {len(stack) - 1} for this {len(stack)}-block model")
    return k


class Evaluator(WindowScorer):
    """Mean objective (LM loss or drift) of the model with some blocks removed, on fixed
    windows: the one per-window scorer (:class:`~depthprobe.probes.scoring.WindowScorer`), so
    on held-out windows :meth:`loss` is ``evaluate.heldout.heldout_loss``."""

    def __init__(self, stack: LayerStack, input_ids: torch.Tensor, batch_size: int = 4):
        super().__init__(stack, input_ids, batch_size)
        self.input_ids = input_ids
        self.batch_size = batch_size

    @property
    def lm(self) -> bool:
        return self.objective.lm

    def fingerprint(self) -> str:
        """Identifies the search: model structure and weights sample, tokens, batch size."""
        return f"{sweep_fingerprint(self.stack, self.input_ids, False, [])}:{self.batch_size}:{self.lm}"

    def loss(self, removed: Sequence[int] = ()) -> float:
        """Objective of the model without blocks ``removed`` (mean over windows)."""
        return float(self.scores(removed).mean())

    def _loss_or_nan(self, removed: list[int]) -> float:
        """:meth:`loss`, or NaN where the model's own forward cannot run without ``removed``."""
        try:
            return self.loss(removed)
        except MODEL_FORWARD_ERRORS as exc:
            if not refused_by_model(exc):
                raise
            return math.nan

    @torch.no_grad()
    def removal_losses(self, removed: Sequence[int], candidates: Sequence[int]) -> dict[int, float]:
        """Objective after removing ``removed`` plus each one of ``candidates``, using one
        prefix pass of the current model per batch (cached block inputs)."""
        if self.stack.reads_earlier_state:  # no cached block inputs: later blocks need what the prefix leaves
            return {c: self._loss_or_nan([*removed, c]) for c in candidates}
        removed = set(removed)
        keep = [i for i in range(len(self.stack)) if i not in removed]
        sums = {c: [] for c in candidates}
        for b, batch in self.placed():
            scorer = BatchScorer(self.objective, batch, self.reference(b, batch))
            states, _ = capture_states(self.objective, batch, keep=keep)
            for c in candidates:
                rest = [i for i in keep if i > c]
                sums[c].append(scorer.run(c, states[c], keep=rest))
        return {c: float(np.concatenate(v).mean()) for c, v in sums.items()}


@dataclass
class PruneStep:
    num_removed: int
    removed: list[int]
    loss: float


def greedy(evaluator: Evaluator, k: int, progress: bool = True,
           progress_file: str | Path | None = None) -> list[PruneStep]:
    """Remove ``k`` blocks one at a time, each time the cheapest given those already removed.

    With ``progress_file`` every finished step is journaled there and a rerun replays them
    (``depthprobe.journal``), so a killed greedy search resumes where it stopped.
    """
    journal = Journal(progress_file, evaluator.fingerprint())
    removed: list[int] = []
    base = journal.get(0)
    if base is None:
        base = evaluator.loss()
        journal.append(0, base)
    steps = [PruneStep(0, [], base)]
    for i in tqdm(range(1, k + 1), desc="greedy prune", disable=not progress, leave=False):
        done = journal.get(i)
        if done is None:
            candidates = [c for c in range(len(evaluator.stack)) if c not in removed]
            losses = evaluator.removal_losses(removed, candidates)
            finite = {c: v for c, v in losses.items() if math.isfinite(v)}
            if not finite:
                raise DepthprobeError(f"greedy step {i}: the model's own forward fails without any one more block "
                                      f"(after removing {sorted(removed)}); remove fewer blocks")
            best = min(finite, key=finite.get)
            done = [best, losses[best]]
            journal.append(i, done)
        removed.append(int(done[0]))
        steps.append(PruneStep(len(removed), sorted(removed), float(done[1])))
    return steps


def rank_by(scores: Sequence[float]) -> list[int]:
    """Block indices from least to most important (smallest score first; NaN last)."""
    arr = np.asarray(scores, float)
    arr = np.where(np.isfinite(arr), arr, np.inf)
    return [int(i) for i in np.argsort(arr, kind="stable")]


def best_block(angular_matrix: pd.DataFrame, k: int) -> list[int]:
    """The contiguous run l..l+k−1 whose ends are closest: argmin over l of d(x_l, x_{l+k})."""
    column = angular_matrix[k].dropna()
    start = int(column.idxmin())
    return list(range(start, start + k))


def choose(strategy: str, k: int, layers: pd.DataFrame, angular_matrix: pd.DataFrame | None,
           evaluator: Evaluator | None = None, progress: bool = True) -> list[int]:
    """The ``k`` blocks ``strategy`` removes (see module docs)."""
    if strategy == "greedy":
        return greedy(evaluator, k, progress)[-1].removed
    if strategy == "block":
        return best_block(angular_matrix, k)
    return sorted(rank_by(layers[RANK_COLUMNS[strategy]])[:k])


def prune_curve(
    evaluator: Evaluator,
    layers: pd.DataFrame,
    angular_matrix: pd.DataFrame,
    max_removed: int,
    strategies: Sequence[str] = STRATEGIES,
    greedy_steps: list[PruneStep] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Loss and perplexity against the number of removed blocks, for each strategy.

    Columns: strategy, num_removed, removed (``"3;7"``), loss, perplexity.
    """
    rows = []
    base = evaluator.loss()
    for strategy in strategies:
        if strategy == "greedy":
            steps = greedy_steps or greedy(evaluator, max_removed, progress)
            rows += [(strategy, s.num_removed, s.removed, s.loss) for s in steps[: max_removed + 1]]
            continue
        order = rank_by(layers[RANK_COLUMNS[strategy]]) if strategy in RANK_COLUMNS else None
        rows.append((strategy, 0, [], base))
        for k in tqdm(range(1, max_removed + 1), desc=f"curve {strategy}", disable=not progress, leave=False):
            removed = best_block(angular_matrix, k) if strategy == "block" else sorted(order[:k])
            rows.append((strategy, k, removed, evaluator.loss(removed)))
    frame = pd.DataFrame(rows, columns=["strategy", "num_removed", "removed", "loss"])
    frame["removed"] = frame["removed"].map(lambda r: ";".join(str(i) for i in r))
    frame["perplexity"] = [math.exp(v) if evaluator.lm else math.nan for v in frame["loss"]]
    return frame
