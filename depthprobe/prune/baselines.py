"""The block-only baselines ``shrink`` is compared with, on the same windows and the same axes.

- ``greedy-blocks``: prune's greedy (one block at a time, re-measured, prefix-cached);
- ``block``: Gromov et al.'s contiguous run l..l+K−1 with the smallest d(x_l, x_{l+K});
- ``block-influence``: ShortGPT, the K blocks with the smallest 1 − cos(x_l, x_{l+1});
- ``last-blocks``: the last K blocks (Reassessing Layer Pruning, arXiv 2411.15558).

Each row: its calibration loss (the :class:`~depthprobe.prune.select.Evaluator`, the same
scorer as prune) and held-out loss with a 95% bootstrap interval over windows, and the
parameters left (the full model's minus the removed blocks').
"""

from __future__ import annotations

import pandas as pd
from tqdm.auto import tqdm

from depthprobe.data import Windows
from depthprobe.evaluate.heldout import mean_interval, per_window_loss
from depthprobe.prune.select import Evaluator, best_block, greedy, rank_by
from depthprobe.prune.units import count_params

BASELINES = ("greedy-blocks", "block", "block-influence", "last-blocks")


def blocks_for(block_params: list[int], total: int, keep: int) -> int:
    """Fewest blocks any block-only strategy must remove to keep at most ``keep`` parameters
    (counting the smallest blocks first: an upper bound on K for every strategy)."""
    removed, k = 0, 0
    for size in sorted(block_params):
        if total - removed <= keep or k == len(block_params) - 1:
            break
        removed += size
        k += 1
    return k


def baseline_removals(evaluator: Evaluator, layers: pd.DataFrame, angular: pd.DataFrame, max_k: int,
                      greedy_file=None, progress: bool = True) -> dict[str, list[list[int]]]:
    """Blocks removed at K = 0..max_k by each baseline."""
    num = len(evaluator.stack)
    steps = greedy(evaluator, max_k, progress, progress_file=greedy_file)
    order = rank_by(layers["block_influence"])
    return {
        "greedy-blocks": [s.removed for s in steps],
        "block": [[]] + [best_block(angular, k) for k in range(1, max_k + 1)],
        "block-influence": [sorted(order[:k]) for k in range(max_k + 1)],
        "last-blocks": [list(range(num - k, num)) for k in range(max_k + 1)],
    }


def baseline_curve(evaluator: Evaluator, heldout: Windows | None, removals: dict[str, list[list[int]]],
                   progress: bool = True) -> pd.DataFrame:
    """One row per strategy and K: removed blocks, losses, parameters left."""
    stack = evaluator.stack
    sizes = [count_params(b) for b in stack.blocks]
    total = count_params(stack.model)
    cache: dict[tuple[int, ...], tuple] = {}
    rows = []
    bar = tqdm(total=sum(len(v) for v in removals.values()), desc="baselines", disable=not progress, leave=False)
    for strategy, steps in removals.items():
        before: set[int] = set()
        for k, removed in enumerate(steps):
            key = tuple(sorted(removed))
            unit = ";".join(f"block:{i}" for i in sorted(set(key) - before))
            before = set(key)
            if key not in cache:
                held = (mean_interval(per_window_loss(stack, heldout, key, evaluator.batch_size))
                        if heldout is not None else (float("nan"),) * 3)
                cache[key] = (evaluator.loss(key), *held)
            loss, held, low, high = cache[key]
            rows.append({"strategy": strategy, "step": k, "unit": unit,
                         "removed": ";".join(f"block:{i}" for i in key), "loss": loss, "heldout_loss": held,
                         "heldout_loss_low": low, "heldout_loss_high": high,
                         "params": total - sum(sizes[i] for i in key)})
            bar.update()
    bar.close()
    frame = pd.DataFrame(rows)
    frame["params_fraction"] = frame["params"] / total
    return frame


def _best(rows: pd.DataFrame, pick: str) -> dict | None:
    rows = rows.dropna(subset=["heldout_loss"])
    if rows.empty:
        return None
    rows = rows.loc[getattr(rows.groupby("strategy")["params"], pick)()]
    best = rows.loc[rows["heldout_loss"].idxmin()]
    return {"strategy": best["strategy"], "step": int(best["step"]), "removed": best["removed"],
            "params": int(best["params"]), "heldout_loss": float(best["heldout_loss"]), "loss": float(best["loss"])}


def best_block_only(curve: pd.DataFrame, params: int) -> dict | None:
    """The block-only result to beat at the same or more parameters: for each baseline its row
    with the fewest parameters that are still at least ``params``; the lowest held-out loss of those."""
    rows = curve[curve["strategy"].isin(BASELINES) & (curve["params"] >= params) & (curve["step"] > 0)]
    return _best(rows, "idxmin")


def best_block_only_at_target(curve: pd.DataFrame, target: int) -> dict | None:
    """The best block-only model that reaches ``target`` parameters: for each baseline its first
    K at or below it; the lowest held-out loss of those."""
    rows = curve[curve["strategy"].isin(BASELINES) & (curve["params"] <= target) & (curve["step"] > 0)]
    return _best(rows, "idxmax")


__all__ = ["BASELINES", "baseline_curve", "baseline_removals", "best_block_only", "best_block_only_at_target",
           "blocks_for"]
