"""``shrink``: a smaller model to a target, cut at block and sublayer granularity.

:func:`shrink` wires it: calibration and held-out windows -> the full model's losses and
angular diagnostics -> the block-only baselines (``baselines.py``) -> the greedy search over
blocks, attention-only and MLP-only sublayers (``search.py``) -> the final losses -> save
(``depthprobe.model.shrunk``: a ``depthprobe_shrunk`` folder when a sublayer is gone, a plain
folder of the family otherwise). The model passed in is shrunk in place.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from depthprobe.analysis import analyze, max_positions
from depthprobe.config import DEFAULT_REMEASURE, ProbeConfig, RunOptions
from depthprobe.data import Windows, heldout_windows, make_windows
from depthprobe.errors import DepthprobeError
from depthprobe.evaluate.heldout import mean_interval
from depthprobe.journal import Journal, resume_files
from depthprobe.prune.baselines import (
    baseline_curve,
    baseline_removals,
    best_block_only,
    best_block_only_at_target,
    blocks_for,
)
from depthprobe.prune.export import save_model
from depthprobe.prune.search import SearchOptions, StartPoint, Step, greedy_shrink, search_fingerprint
from depthprobe.prune.select import Evaluator
from depthprobe.prune.speed import SpeedTarget
from depthprobe.prune.starts import (
    BLOCK_START,
    FULL_START,
    StartResult,
    block_seed,
    choose,
    copies_fit,
    copy_state,
    replay,
)
from depthprobe.prune.units import KINDS, ShrinkState, count_params
from depthprobe.results import write_json
from depthprobe.safeio import atomic_to_csv

SHRINK_JSON = "shrink.json"
SHRINK_CURVE_CSV = "shrink_curve.csv"
SHRINK_STEPS_CSV = "shrink_steps.csv"
SHRINK_JOURNAL = "shrink_progress.jsonl"
BASELINE_JOURNAL = "shrink_greedy_blocks.jsonl"
BLOCK_START_JOURNAL = "shrink_progress_block_start.jsonl"
CURVE_COLUMNS = ("strategy", "step", "unit", "removed", "loss", "heldout_loss", "heldout_loss_low",
                 "heldout_loss_high", "params", "params_fraction", "prefill_tokens_per_s", "decode_tokens_per_s")


@dataclass(frozen=True)
class ShrinkConfig:
    """One shrink: the target, the units, the held-out check and the calibration windows."""

    target_params: float | None = None  # fraction of the parameters kept
    target_speedup: float | None = None  # measured tokens/s against the original's (``speedup_on``)
    speedup_on: str = "decode"  # prefill | decode
    max_loss_increase: float | None = None  # stop before held-out loss rises more than this (nats)
    units: tuple[str, ...] = KINDS  # block, attn, mlp
    #: re-measure only the N leading candidates per step (lazy greedy); None: all (exact greedy)
    remeasure: int | None = DEFAULT_REMEASURE
    baselines: bool = True
    #: the baselines' largest K without a parameter target (default: half the blocks)
    baseline_max: int | None = None
    heldout: bool = True  # score every step on held-out windows (needed by max_loss_increase)
    heldout_windows: int = 16
    eval_text_file: str | None = None
    eval_dataset: str | None = None
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def __post_init__(self):
        object.__setattr__(self, "units", tuple(self.units))
        check_targets(self.target_params, self.max_loss_increase, self.target_speedup)
        if self.target_speedup is not None and not self.target_speedup > 1:
            raise DepthprobeError(f"--target-speedup must be above 1 (got {self.target_speedup})")
        if self.speedup_on not in ("prefill", "decode"):
            raise DepthprobeError(f"--speedup-on is prefill or decode (got {self.speedup_on!r})")
        if self.max_loss_increase is not None and not self.heldout:
            raise DepthprobeError("--max-loss-increase is judged on held-out windows; drop --no-heldout")
        bad = [u for u in self.units if u not in KINDS]
        if bad or not self.units:
            raise DepthprobeError(f"units must be some of {', '.join(KINDS)} (got {', '.join(self.units) or 'none'})")
        if self.remeasure is not None and self.remeasure < 1:
            raise DepthprobeError(f"--remeasure must be at least 1 (got {self.remeasure})")
        if self.heldout_windows < 1:
            raise DepthprobeError(f"--heldout-windows must be at least 1 (got {self.heldout_windows})")


def check_targets(target_params: float | None, max_loss_increase: float | None, target_speedup=None) -> None:
    """Exactly one of --target-params / --target-speedup, or --max-loss-increase alone."""
    targets = [name for name, v in (("--target-params", target_params), ("--target-speedup", target_speedup))
               if v is not None]
    if len(targets) > 1:
        raise DepthprobeError(f"give one target, not {' and '.join(targets)} (--max-loss-increase may join either)")
    if not targets and max_loss_increase is None:
        raise DepthprobeError("give a target: --target-params F (fraction of parameters kept), --target-speedup S, "
                              "or --max-loss-increase X")
    if target_params is not None and not 0 < target_params < 1:
        raise DepthprobeError(f"--target-params must be a fraction between 0 and 1 (got {target_params})")
    if max_loss_increase is not None and not max_loss_increase >= 0:
        raise DepthprobeError(f"--max-loss-increase must be at least 0 nats (got {max_loss_increase})")


def reachable_params(total: int, block_params: list[int], smallest_sublayer: int) -> int:
    """The fewest parameters shrink can leave: everything but the blocks, plus one sublayer."""
    return total - sum(block_params) + smallest_sublayer


@dataclass
class ShrinkResult:
    removed: list[str]  # units in the order removed (block:L, attn:L, mlp:L; original numbering)
    steps: list[Step]
    stopped: str  # target | max_loss_increase | exhausted
    params_before: int
    params_after: int
    loss_before: float
    loss_after: float
    heldout_before: tuple[float, float, float] | None  # mean, low, high (95%)
    heldout_after: tuple[float, float, float] | None
    curve: pd.DataFrame
    block_only: dict | None  # the best block-only baseline at the same or more parameters
    export: dict
    num_layers_before: int
    num_layers_after: int
    heldout_source: str | None = None
    speed: dict | None = None  # --target-speedup: the exported model's measured speed against the original's
    calibration_check: dict | None = None
    search: str = "greedy, every candidate re-measured at every step"
    block_only_at_target: dict | None = None  # the best block-only model that reaches the parameter target
    target_params: int | None = None  # the parameter count asked for (--target-params), if any
    starts: list[dict] = field(default_factory=list)  # each start's search (``starts.py``), when there were two
    model: torch.nn.Module | None = field(default=None, repr=False)

    @property
    def params_fraction(self) -> float:
        return self.params_after / self.params_before

    def summary(self) -> dict:
        held = {}
        if self.heldout_before is not None:
            held = {"heldout_source": self.heldout_source, "heldout_loss_before": self.heldout_before[0],
                    "heldout_loss_before_interval": list(self.heldout_before[1:]),
                    "heldout_loss_after": self.heldout_after[0],
                    "heldout_loss_after_interval": list(self.heldout_after[1:])}
        beats = beats_at_target = None
        if self.block_only is not None and self.heldout_after is not None:
            beats = bool(self.heldout_after[0] <= self.block_only["heldout_loss"])
        if self.block_only_at_target is not None and self.heldout_after is not None:
            beats_at_target = bool(self.heldout_after[0] <= self.block_only_at_target["heldout_loss"])
        return {"removed": self.removed, "search": self.search, "num_removed": len(self.removed), "stopped": self.stopped,
                "params_before": self.params_before, "params_after": self.params_after,
                "params_fraction": self.params_fraction, "num_layers_before": self.num_layers_before,
                "num_layers_after": self.num_layers_after, "loss_before": self.loss_before,
                "loss_after": self.loss_after, "perplexity_before": math.exp(self.loss_before),
                "perplexity_after": math.exp(self.loss_after), **held, "block_only_best": self.block_only,
                "heldout_at_or_below_block_only": beats, "target_params": self.target_params,
                "block_only_at_target": self.block_only_at_target,
                "heldout_at_or_below_block_only_at_target": beats_at_target,
                "starts": self.starts, "export": self.export, "speed": self.speed,
                "calibration_check": self.calibration_check}


def shrink(model: torch.nn.Module, tokenizer, config: ShrinkConfig, *, windows: Windows | None = None,
           out_dir: str | Path | None = None, run: RunOptions | None = None) -> ShrinkResult:
    """Shrink ``model`` in place to ``config``'s target; with ``out_dir``, save it there with
    ``shrink.json``, ``shrink_curve.csv`` and ``shrink_steps.csv``.

    Example:
        >>> model, tok = depthprobe.load_model("smollm2")                                   # doctest: +SKIP
        >>> r = shrink(model, tok, ShrinkConfig(target_params=0.8), out_dir="runs/smol-80")  # doctest: +SKIP
        >>> r.removed, r.params_fraction, r.heldout_after                                   # doctest: +SKIP
    """
    run = run or RunOptions()
    state = ShrinkState(model, config.probe.layers_path)
    if not state.stack.is_causal_lm:
        raise DepthprobeError("shrink scores removals by next-token loss and needs a causal LM; this model has no LM head")
    windows = windows if windows is not None else _windows(model, tokenizer, config.probe)
    held = _heldout(model, tokenizer, windows, config) if config.heldout else None
    target = _target_params(state, config)
    speed = SpeedTarget(config.target_speedup, config.speedup_on) if config.target_speedup is not None else None
    if speed is not None:
        speed.start(state)
    journals = resume_files(out_dir, (SHRINK_JOURNAL, BLOCK_START_JOURNAL, BASELINE_JOURNAL), run.resume)
    bs = config.probe.batch_size
    num_layers = state.num_layers
    evaluator = Evaluator(state.stack, windows.input_ids, bs)
    loss_before = evaluator.loss()
    held_before = mean_interval(state.scores(held, bs)) if held is not None else None
    task = _Task(model, state, windows, held, config, target, journals, run.progress)
    baselines = _baselines(task, evaluator)
    steps, stopped, starts = _search(task, baselines, speed, held_before[0] if held_before else None)
    loss_after = float(state.scores(windows, bs).mean())
    held_after = mean_interval(state.scores(held, bs)) if held is not None else None
    if speed is not None and stopped != "target":
        raise DepthprobeError(f"--target-speedup {config.target_speedup} is unreachable: the search stopped "
                              f"({stopped}) at {max(speed.measured.values(), default=speed.reference) / speed.reference:.3f}x "
                              f"measured; the finished steps are journaled in --out: rerun with a lower target and --resume")
    curve = _curve(state, steps, loss_before, held_before, baselines, speed)
    result = ShrinkResult([u.name for u in state.removed], steps, stopped, state.params_before, state.params,
                          loss_before, loss_after, held_before, held_after, curve,
                          best_block_only(curve, state.params) if baselines is not None else None,
                          export_info(state), num_layers, len(state.kept),
                          heldout_source=held.source if held is not None else None, model=model)
    result.search = search_note(config, starts)
    result.starts = [s.summary() for s in starts]
    result.target_params = target
    if baselines is not None and target is not None:
        result.block_only_at_target = best_block_only_at_target(curve, target)
    if out_dir is not None:
        save(result, model, tokenizer, out_dir)
        if speed is not None:
            from depthprobe.model.load import load_model

            result.speed = speed.export_check(load_model(str(out_dir), dtype=str(next(model.parameters()).dtype)
                                                         .removeprefix("torch."), device=str(state.stack.device))[0])
            write_json(Path(out_dir) / SHRINK_JSON, result.summary())
        for path in journals.values():
            path.unlink(missing_ok=True)
    return result


def search_note(config: ShrinkConfig, starts: list[StartResult] = ()) -> str:
    """How the search ran (``shrink.json`` ``search``)."""
    if config.remeasure is None:
        note = "greedy, every candidate re-measured at every step"
    else:
        note = (f"lazy greedy: a full sweep at step 1, then the {config.remeasure} candidates with the least damage "
                "per parameter when last measured re-measured at each step (every candidate at the step that reaches "
                "the target)")
    if starts:
        chosen = choose(list(starts)).name
        note += (f"; from two starts (the full model, and the block-only greedy's blocks but its last), the one with "
                 f"the lower calibration loss kept: {chosen}")
    return note


@dataclass
class _Task:
    """What the baselines and the search of one ``shrink`` call share."""

    model: torch.nn.Module
    state: ShrinkState
    windows: Windows
    held: Windows | None
    config: ShrinkConfig
    target: int | None  # parameters
    journals: dict  # journal name -> path
    progress: bool


def _search(task: _Task, baselines: pd.DataFrame | None, speed: SpeedTarget | None,
            full_held: float | None) -> tuple[list[Step], str, list[StartResult]]:
    """The unit greedy to the target (``starts.py``): from the full model and, with a parameter
    target, from the block-only greedy's first K* − 1 blocks, each on a copy, the better one
    replayed on ``state``; in place from the full model alone where no second start applies."""
    model, state, windows, held, config = task.model, task.state, task.windows, task.held, task.config
    target, journals, progress = task.target, task.journals, task.progress
    bs = config.probe.batch_size
    options = SearchOptions(bs, config.units, config.max_loss_increase, config.remeasure, target)
    stop = speed or ((lambda s: s.params <= target) if target is not None else (lambda s: False))
    fingerprint = f"{search_fingerprint(state, windows, held, bs, config.units)}:{config.remeasure}"
    seed = block_seed(baselines, target) if baselines is not None and target is not None and speed is None else []
    guard = config.max_loss_increase
    if guard is not None and full_held is not None and any(s.heldout_loss - full_held > guard for s in seed):
        seed = []  # the block start would already break the held-out guard
    if not seed or not copies_fit(model):
        journal = Journal(journals.get(SHRINK_JOURNAL), fingerprint, what="shrink")
        steps, stopped = greedy_shrink(state, windows, held, stop=stop, options=options, journal=journal,
                                       progress=progress)
        return steps, stopped, []
    results = []
    for name, seeded, journal_name in ((FULL_START, [], SHRINK_JOURNAL), (BLOCK_START, seed, BLOCK_START_JOURNAL)):
        trial = copy_state(model, config.probe.layers_path, seeded)
        journal = Journal(journals.get(journal_name), f"{fingerprint}:{','.join(s.unit for s in seeded)}",
                          what="shrink")
        found, stopped = greedy_shrink(trial, windows, held, stop=stop, options=options, journal=journal,
                                       progress=progress, start=StartPoint(len(seeded), full_held))
        steps = seeded + found
        last = steps[-1] if steps else None
        results.append(StartResult(name, steps, stopped, last.loss if last else math.nan,
                                   last.heldout_loss if last else math.nan, trial.params, [s.unit for s in seeded]))
        del trial
    best = choose(results)
    replay(state, [s.unit for s in best.steps])
    return best.steps, best.stopped, results


def _windows(model, tokenizer, probe: ProbeConfig) -> Windows:
    return make_windows(tokenizer, num_sequences=probe.num_sequences, seq_len=probe.seq_len,
                        text_file=probe.text_file, dataset=probe.dataset, max_positions=max_positions(model))


def _heldout(model, tokenizer, windows: Windows, config: ShrinkConfig) -> Windows:
    return heldout_windows(tokenizer, num_sequences=config.heldout_windows, seq_len=windows.seq_len,
                           calibration=windows, text_file=config.eval_text_file, dataset=config.eval_dataset,
                           max_positions=max_positions(model))


def _target_params(state: ShrinkState, config: ShrinkConfig) -> int | None:
    """The parameter count to reach, refused in one line when no shrink can reach it."""
    if config.target_params is None:
        return None
    target = int(math.floor(config.target_params * state.params_before))
    blocks = [count_params(b) for b in state.stack.blocks]
    smallest = min((state.unit_params(u) for u in state.candidates(config.units)), default=0)
    floor = reachable_params(state.params_before, blocks, smallest if set(config.units) & {"attn", "mlp"} else
                             min(blocks))
    if target < floor:
        raise DepthprobeError(
            f"--target-params {config.target_params} would remove every block: at least one block must stay, so "
            f"this model keeps at least {floor / state.params_before:.4f} of its {state.params_before:,} parameters "
            "(embeddings, head and norms are never removed); ask for a larger fraction")
    return target


def _baselines(task: _Task, evaluator: Evaluator) -> pd.DataFrame | None:
    """Every block-only baseline's curve, on the full model (before the search changes it)."""
    state, config, target, journals, progress = task.state, task.config, task.target, task.journals, task.progress
    if not config.baselines:
        return None
    blocks = [count_params(b) for b in state.stack.blocks]
    max_k = (blocks_for(blocks, state.params_before, target) if target is not None
             else config.baseline_max or max(1, len(blocks) // 2))
    max_k = min(max(max_k, 1), len(blocks) - 1)
    probe = ProbeConfig(metrics="angular", batch_size=config.probe.batch_size, layers_path=config.probe.layers_path)
    analysis = analyze(task.model, config=probe, windows=task.windows, stack=state.stack,
                       run=RunOptions(progress=progress, loss=False))
    removals = baseline_removals(evaluator, analysis.layers, analysis.angular_distance, max_k,
                                 journals.get(BASELINE_JOURNAL), progress)
    return baseline_curve(evaluator, task.held, removals, progress)


def _curve(state: ShrinkState, steps: list[Step], loss_before: float, held_before, baselines,
           speed: SpeedTarget | None = None) -> pd.DataFrame:
    """``shrink_curve.csv``: the shrink's steps (strategy ``shrink``) then every baseline."""
    removed: list[str] = []
    nan = math.nan
    rows = [{"strategy": "shrink", "step": 0, "unit": "", "removed": "", "loss": loss_before,
             "heldout_loss": held_before[0] if held_before else nan, "heldout_loss_low": held_before[1] if held_before
             else nan, "heldout_loss_high": held_before[2] if held_before else nan, "params": state.params_before}]
    for s in steps:
        removed += [s.unit] + ([s.also] if s.also else [])
        rows.append({"strategy": "shrink", "step": s.step, "unit": s.unit, "removed": ";".join(removed),
                     "loss": s.loss, "heldout_loss": s.heldout_loss, "heldout_loss_low": nan,
                     "heldout_loss_high": nan, "params": s.params})
    frame = pd.DataFrame(rows)
    frame["params_fraction"] = frame["params"] / state.params_before
    if speed is not None:  # measured speeds only, at the steps where they were measured
        frame[f"{speed.on}_tokens_per_s"] = [speed.reference if k == 0 else speed.measured.get(k, nan)
                                             for k in frame["step"]]
    if baselines is not None:
        frame = pd.concat([frame, baselines], ignore_index=True)
    for column in CURVE_COLUMNS:
        if column not in frame:
            frame[column] = nan
    return frame[list(CURVE_COLUMNS)]


def export_info(state: ShrinkState) -> dict:
    """What the saved folder is and what it needs to load (``shrink.json`` ``export``)."""
    if state.spec:
        return {"format": "depthprobe_shrunk", "model_type": "depthprobe_shrunk",
                "base_model_type": getattr(state.model.config, "model_type", None),
                "loads_with": "import depthprobe; AutoModelForCausalLM.from_pretrained(folder)",
                "needs": "depthprobe imported (it registers the depthprobe_shrunk model type with AutoConfig / "
                         "AutoModelForCausalLM); no trust_remote_code",
                "removed_sublayers": [f"{e['kind']}:{e['layer']}" for e in state.spec],
                "note": "block numbers in removed_sublayers are the saved model's"}
    return {"format": "plain", "model_type": getattr(state.model.config, "model_type", None),
            "loads_with": "AutoModelForCausalLM.from_pretrained(folder)", "needs": "transformers only",
            "removed_sublayers": []}


def save(result: ShrinkResult, model, tokenizer, out_dir: str | Path) -> Path:
    out = save_model(model, tokenizer, out_dir)
    write_json(out / SHRINK_JSON, result.summary())
    atomic_to_csv(result.curve, out / SHRINK_CURVE_CSV, index=False, float_format="%.10g")
    atomic_to_csv(pd.DataFrame([dataclasses.asdict(s) for s in result.steps], columns=list(Step.__annotations__)),
                  out / SHRINK_STEPS_CSV, index=False, float_format="%.10g")
    return out


def calibration_overlap(first: list[str], second: list[str], source: str) -> dict:
    """How far two calibration texts agree on the units to remove: shared units, Jaccard
    |A ∩ B| / |A ∪ B|, and the units only one of them chose."""
    a, b = set(first), set(second)
    union = a | b
    return {"text_file": str(source), "units_first": list(first), "units_second": list(second),
            "shared": len(a & b), "jaccard": len(a & b) / len(union) if union else 1.0,
            "only_first": sorted(a - b), "only_second": sorted(b - a)}


def record_calibration_check(out_dir: str | Path, check: dict) -> None:
    """Add the calibration check to ``shrink.json``."""
    path = Path(out_dir) / SHRINK_JSON
    import json

    summary = json.loads(path.read_text())
    summary["calibration_check"] = check
    write_json(path, summary)
