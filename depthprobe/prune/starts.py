"""Where ``shrink``'s greedy search starts, and the choice between the starts.

The unit greedy (``search.py``: least damage per parameter first) is myopic: early cheap
sublayers can steer it away from a set of whole blocks that costs less in the end (on SmolLM2
at 0.8 of the parameters it ended 0.04 nats above the block-only greedy on its own calibration
windows). So with a parameter target it runs from two starts:

- ``full model``: the unit greedy from the unpruned model;
- ``greedy-blocks``: the block-only greedy's first K* − 1 blocks (K* its first K that reaches
  the target; measured by the baselines already), then the unit greedy to the target. That
  search's last step takes the least damaging unit that reaches the target, and the block-only
  greedy's K*-th block is one of them, so this start ends at or below the block-only greedy's
  calibration loss at the target.

Each start runs on a copy of the model (when two copies fit in the memory free on its device);
the one with the lower calibration loss (the search's objective; held-out windows only check)
is replayed on the model itself: removals in the same order, nothing re-measured.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import pandas as pd
import torch

from depthprobe.prune.search import Step
from depthprobe.prune.units import ShrinkState, Unit

FULL_START = "full model"
BLOCK_START = "greedy-blocks"


@dataclass
class StartResult:
    """One start's search: its steps (the seed's blocks first), why it ended, its final losses."""

    name: str
    steps: list[Step]
    stopped: str
    loss: float  # calibration loss at the end
    heldout_loss: float
    params: int
    seed: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"start": self.name, "seed": self.seed, "removed": [s.unit for s in self.steps],
                "stopped": self.stopped, "loss": self.loss, "heldout_loss": self.heldout_loss,
                "params": self.params}


def block_seed(curve: pd.DataFrame, target: int) -> list[Step]:
    """The block-only greedy's first K* − 1 removals as steps (damage, losses and parameters
    from its own measurements), K* its first K at or below ``target``; [] when K* <= 1 or
    the greedy never reaches the target."""
    rows = curve[curve["strategy"] == "greedy-blocks"].sort_values("step").reset_index(drop=True)
    reaching = rows.index[(rows["params"] <= target) & (rows["step"] > 0)]
    if len(reaching) == 0 or rows.loc[reaching[0], "step"] <= 1:
        return []
    steps = []
    for k in range(1, int(rows.loc[reaching[0], "step"])):
        before, now = rows.loc[k - 1], rows.loc[k]
        unit_params = int(before["params"] - now["params"])
        damage = float(now["loss"] - before["loss"])
        steps.append(Step(k, str(now["unit"]), "", damage, unit_params, damage / unit_params, float(now["loss"]),
                          float(now["heldout_loss"]), int(now["params"])))
    return steps


def copies_fit(model: torch.nn.Module) -> bool:
    """Whether a copy of ``model`` fits in half the memory free now on its device."""
    from depthprobe.model.system import available_memory

    try:
        device = next(model.parameters()).device
    except StopIteration:
        return True
    if device.type == "meta" or len({p.device for p in model.parameters()}) > 1:
        return False  # offloaded or spread over devices: no copy
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    room = available_memory().get("cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}")
    return room is not None and 2 * size <= room


def copy_state(model: torch.nn.Module, layers_path: str | None, seed: list[Step]) -> ShrinkState:
    """A copy of ``model`` as a search state with ``seed``'s units removed."""
    state = ShrinkState(copy.deepcopy(model), layers_path)
    replay(state, [s.unit for s in seed])
    return state


def replay(state: ShrinkState, units: list[str]) -> None:
    """Remove ``units`` in order (the steps' units: a block a step emptied goes with it)."""
    for name in units:
        state.remove(Unit.parse(name))


def choose(starts: list[StartResult]) -> StartResult:
    """The start that ended at the target with the lowest calibration loss (the first on ties);
    where none reached it (the held-out guard stopped them), the one that removed the most."""
    finished = [s for s in starts if s.stopped == "target" and math.isfinite(s.loss)]
    if finished:
        return min(finished, key=lambda s: s.loss)
    return min(starts, key=lambda s: (s.params, s.loss))


__all__ = ["BLOCK_START", "FULL_START", "StartResult", "block_seed", "choose", "copies_fit", "copy_state", "replay"]
