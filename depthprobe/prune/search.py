"""The greedy search of ``shrink``: one unit at a time, the least damage per parameter.

At every step the drop sweep (:func:`depthprobe.probes.drop.run_drop_sweep`, prefix-cached:
one pass stores each block's input, then each drop reruns only the blocks after it) runs on the
model *as it is now* (earlier units already removed), so every candidate's damage is re-measured:

    damage(u) = loss(model without u) − loss(model)          (calibration windows)
    rank(u)   = damage(u) / params(u)                        (smallest first)

The chosen unit is checked on the held-out windows (its held-out loss is recorded; with
``max_loss_increase`` a step whose held-out loss would rise more than that above the full
model's is not taken, and the search stops) and then removed for good. Finished steps are
journaled, so a killed search resumes by replaying them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from tqdm.auto import tqdm

from depthprobe.data import Windows
from depthprobe.journal import Journal
from depthprobe.probes.drop import _fingerprint as sweep_fingerprint
from depthprobe.probes.drop import run_drop_plan
from depthprobe.probes.drop_tables import DropPlan, Variant
from depthprobe.prune.units import KINDS, ShrinkState, Unit


@dataclass
class Step:
    """One removal: the unit, what it cost and the model after it."""

    step: int
    unit: str  # block:L | attn:L | mlp:L (original numbering)
    also: str  # a block removed with it (both its sublayers gone), else ""
    damage: float  # calibration loss increase this step
    unit_params: int
    damage_per_param: float
    loss: float  # calibration loss after the step
    heldout_loss: float  # held-out loss after the step
    params: int  # parameters left


def candidate_losses(state: ShrinkState, windows: Windows, batch_size: int, kinds=KINDS,
                     progress: bool = False, only: list[Unit] | None = None) -> tuple[float, dict[Unit, float]]:
    """Calibration loss of the model now and of the model without each candidate (or each of
    ``only``), from one drop sweep (the sweep seam, prefix cache) of the model as it is now."""
    sublayers = any(k in kinds for k in ("attn", "mlp"))
    plan = DropPlan.of(state.stack, sublayers, ())
    if only is not None:
        plan = plan.subset(Variant(u.kind, state.index(u.layer), 1 if u.kind == "block" else 0) for u in only)
    result = run_drop_plan(state.stack, windows, plan, batch_size=batch_size, progress=progress)
    rows = {"block": result.block, "attn": result.attn, "mlp": result.mlp}
    losses = {}
    for unit in state.candidates(kinds) if only is None else only:
        values = rows.get(unit.kind)
        if values is None:
            continue
        value = float(values[state.index(unit.layer)].mean())
        if math.isfinite(value):
            losses[unit] = value
    return float(result.base.mean()), losses


def rank(state: ShrinkState, base: float, losses: dict[Unit, float]) -> list[tuple[float, Unit]]:
    """Candidates by damage per parameter, smallest first (ties: by name, for determinism)."""
    return sorted(((losses[u] - base) / state.unit_params(u), u) for u in losses)


def search_fingerprint(state: ShrinkState, windows: Windows, heldout: Windows | None, batch_size: int,
                       kinds) -> str:
    held = "" if heldout is None else sweep_fingerprint(state.stack, heldout.input_ids, False, [])
    return f"{sweep_fingerprint(state.stack, windows.input_ids, True, [])}:{held}:{batch_size}:{','.join(kinds)}"


@dataclass(frozen=True)
class SearchOptions:
    batch_size: int = 4
    kinds: tuple[str, ...] = KINDS  # the units that may go
    #: the held-out guard: a step whose held-out loss rises more than this above the full model's is not taken
    max_loss_increase: float | None = None
    #: None re-measures every candidate at every step (exact greedy); N re-measures only the N
    #: candidates whose last measured damage per parameter is smallest (lazy greedy; a full
    #: sweep at the first step), for models too large for a full sweep per step
    remeasure: int | None = None
    #: the parameter count to reach: the last step, the one that reaches it, takes the unit with
    #: the least damage among those that reach it (every candidate measured), not the least per parameter
    target_params: int | None = None


@dataclass(frozen=True)
class StartPoint:
    """Where a search starts when ``state`` is not the full model (a seeded start)."""

    #: removals made before this search (its steps are numbered after them)
    done_steps: int = 0
    #: the unpruned model's held-out loss, which the guard measures from (None: the held-out
    #: loss of ``state`` as it is now)
    full_heldout: float | None = None


def greedy_shrink(state: ShrinkState, windows: Windows, heldout: Windows | None, *, stop: Callable[[ShrinkState], bool],
                  options: SearchOptions = SearchOptions(), journal: Journal | None = None,
                  progress: bool = True, start: StartPoint = StartPoint()) -> tuple[list[Step], str]:
    """Remove units until ``stop(state)`` (or no candidate is left, or the held-out guard).

    Returns the steps and why the search ended: ``target``, ``max_loss_increase`` or ``exhausted``.
    """
    batch_size, kinds, max_loss_increase = options.batch_size, options.kinds, options.max_loss_increase
    stale: dict[Unit, float] = {}
    journal = journal or Journal(None, "")
    done_steps, full_held = start.done_steps, start.full_heldout
    full_held = full_held if full_held is not None else (
        float(state.scores(heldout, batch_size).mean()) if heldout is not None else math.nan)
    steps: list[Step] = []
    bar = tqdm(desc="shrink", unit="unit", disable=not progress, leave=False)
    try:
        while not stop(state):
            number = done_steps + len(steps) + 1
            done = journal.get(number)
            if done is not None:  # a finished step of an interrupted run: replay it
                stale = {Unit.parse(k): v for k, v in done.pop("scores", {}).items()}
                step = Step(**done)
                state.remove(Unit.parse(step.unit))
            else:
                last = _last_step(state, kinds, options.target_params)
                only = None if last else _leading(state, stale, kinds, options.remeasure)
                step = _next_step(state, windows, heldout, options, number, only, stale, last)
                if step is None:
                    return steps, "exhausted"
                if max_loss_increase is not None and step.heldout_loss - full_held > max_loss_increase:
                    return steps, "max_loss_increase"
                step.also = ";".join(u.name for u in state.remove(Unit.parse(step.unit))[1:])
                step.params = state.params
                journal.append(step.step, {**asdict(step), "scores": {u.name: v for u, v in stale.items()
                                                                      if state.has(u)}})
            steps.append(step)
            bar.update()
            bar.set_postfix_str(f"{step.unit} params {step.params / state.params_before:.3f}")
    finally:
        bar.close()
    return steps, "target"


def _leading(state: ShrinkState, stale: dict[Unit, float], kinds, remeasure: int | None) -> list[Unit] | None:
    """The candidates to re-measure this step (None: all of them)."""
    candidates = state.candidates(kinds)
    if remeasure is None or not stale or any(u not in stale for u in candidates):
        return None
    return sorted(candidates, key=lambda u: (stale[u], u))[:remeasure]


def _last_step(state: ShrinkState, kinds, target: int | None) -> bool:
    """Whether one unit can reach the parameter target from here."""
    if target is None:
        return False
    return any(state.params - state.unit_params(u) <= target for u in state.candidates(kinds))


def _next_step(state: ShrinkState, windows: Windows, heldout: Windows | None, options: SearchOptions,
               number: int, only: list[Unit] | None = None, stale: dict | None = None,
               last: bool = False) -> Step | None:
    """Measure the candidates (``only``, else all) on the model as it is now; the best one,
    checked on held-out windows. ``stale`` gets every measured damage per parameter. On the
    ``last`` step (one unit reaches ``options.target_params``), the least damaging unit that reaches it."""
    batch_size, kinds = options.batch_size, options.kinds
    reach = options.target_params if last else None
    base, losses = candidate_losses(state, windows, batch_size, kinds, only=only)
    ranked = rank(state, base, losses)
    if stale is not None:
        stale.update({u: score for score, u in ranked})
    if not ranked:
        return None
    score, unit = ranked[0]
    reaching = [u for _, u in ranked if state.params - state.unit_params(u) <= reach] if reach is not None else []
    if reaching:
        unit = min(reaching, key=lambda u: (losses[u], u))
        score = (losses[unit] - base) / state.unit_params(unit)
    heldout_loss = math.nan
    if heldout is not None:
        heldout_loss = float(np.mean(state.scores_without(unit, heldout, batch_size)))
    params = state.unit_params(unit)
    return Step(number, unit.name, "", losses[unit] - base, params, score, losses[unit], heldout_loss,
                state.params - params)
