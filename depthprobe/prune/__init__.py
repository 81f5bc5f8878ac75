"""Layer choice, pruning curves and export of a pruned model.

    (the drop sweep that measures each block's damage is a probe: depthprobe.probes.drop;
    ``depthprobe.prune.sweep`` re-exports it)
    select.py  strategies drop | greedy | angular | block-influence | block, pruning curves
               (and ``depthprobe.stats.prune_excess``: each strategy's loss against greedy's)
    export.py  remove blocks for good, save a model that loads with from_pretrained

:func:`prune` wires them: analyze -> choose -> curve -> remove -> verify -> save.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from depthprobe.analysis import analyze, max_positions
from depthprobe.config import ProbeConfig, RunOptions
from depthprobe.data import Windows, heldout_windows, make_windows
from depthprobe.errors import DepthprobeError
from depthprobe.evaluate.heldout import add_heldout_columns, heldout_summary, score_removals
from depthprobe.journal import resume_files
from depthprobe.model.stack import LayerStack
from depthprobe.prune.config import HELDOUT_WINDOWS, PruneConfig, from_keywords
from depthprobe.prune.export import remove_blocks, save_model
from depthprobe.prune.heal import HealConfig, heal_lora
from depthprobe.prune.repair import RepairConfig, repair_linear
from depthprobe.prune.seam import (
    SeamOptions,
    SeamReport,
    after_removal,
    before_removal,
    check_causal,
    curve_steps,
    fit_windows,
    merge_curve,
)
from depthprobe.prune.select import (
    STRATEGIES,
    Evaluator,
    choose,
    greedy,
    prune_curve,
    validate_k,
    validate_removal,
)
from depthprobe.results import AnalysisResult, write_json
from depthprobe.runs import (
    ANALYSIS_DIR,
    DROP_PROGRESS,
    ORIGINAL_DIR,
    PRUNE_CURVE_CSV,
    PRUNE_EXCESS_CSV,
    PRUNE_JSON,
)
from depthprobe.safeio import atomic_to_csv
from depthprobe.stats import prune_excess

#: journals of an unfinished prune in its --out folder (removed once the model is saved)
DROP_JOURNAL = DROP_PROGRESS
GREEDY_JOURNAL = "greedy_progress.jsonl"

__all__ = [
    "HELDOUT_WINDOWS", "STRATEGIES", "HealConfig", "PruneConfig", "PruneResult", "RepairConfig", "RunOptions",
    "SeamOptions", "heal_lora", "prune", "remove_blocks", "repair_linear", "save_model",
]

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    removed: list[int]
    strategy: str
    loss_before: float
    loss_after: float
    objective: str
    curve: pd.DataFrame | None
    analysis: AnalysisResult
    #: per strategy and K: its loss against greedy's (the least harmful K found), ``stats.prune_excess``
    excess: pd.DataFrame | None = None
    #: held-out loss before/after with bootstrap intervals (``evaluate.heldout.heldout_summary``)
    heldout: dict | None = None
    #: held-out losses of plain removal, repair and healing (``--repair`` / ``--heal``)
    seam: SeamReport | None = None
    #: the pruned model's own diagnostics (angular, variance; same windows); ``analysis`` is the original's
    pruned_analysis: AnalysisResult | None = None

    @property
    def perplexity_before(self) -> float:
        return math.exp(self.loss_before) if self.objective == "lm_loss" else math.nan

    @property
    def perplexity_after(self) -> float:
        return math.exp(self.loss_after) if self.objective == "lm_loss" else math.nan

    def summary(self) -> dict:
        return {
            "strategy": self.strategy,
            "removed": self.removed,
            "num_removed": len(self.removed),
            "num_layers_before": self.analysis.num_layers,
            "num_layers_after": self.analysis.num_layers - len(self.removed),
            "objective": self.objective,
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "perplexity_before": self.perplexity_before,
            "perplexity_after": self.perplexity_after,
            **(self.heldout or {}),
            **(self.seam.summary() if self.seam is not None else {}),
        }


def prune(
    model: torch.nn.Module,
    tokenizer,
    config: PruneConfig | None = None,
    *,
    windows: Windows | None = None,
    out_dir: str | Path | None = None,
    run: RunOptions | None = None,
    **keywords,
) -> PruneResult:
    """Choose blocks (``config.remove`` explicitly, or ``config.num_layers`` by
    ``config.strategy``), measure the pruning curve of every strategy, remove the blocks in
    place and (with ``out_dir``) save.

    With ``config.heldout`` (default; causal LMs), the curve and the summary also carry the
    loss on ``config.heldout_windows`` held-out windows (``eval_text_file`` / ``eval_dataset``,
    default the built-in text's tail, never the calibration or repair-fit windows), with
    bootstrap intervals over windows; ``config.seam`` (repair / heal) is scored on the same
    windows. ``config.probe`` gives the calibration windows (or pass ready ``windows``). With
    ``out_dir``, finished drop-sweep batches and greedy steps are journaled there until the
    model is saved; ``run.resume`` continues from them after a crash or a kill. ``**keywords``:
    deprecated, for one release: the fields of ``PruneConfig``, ``ProbeConfig`` and
    ``RunOptions`` by name, as before.

    Example:
        >>> model, tok = depthprobe.load_model("smollm2")                                        # doctest: +SKIP
        >>> r = prune(model, tok, PruneConfig(num_layers=6, strategy="greedy"), out_dir="runs/smol-24")  # doctest: +SKIP
        >>> r.removed, r.loss_before, r.loss_after                                             # doctest: +SKIP
    """
    config, run = from_keywords(config, run, keywords)
    stack, remove, k = _validated(model, config)
    windows = windows if windows is not None else _windows(model, tokenizer, config.probe)
    # fit and held-out windows first: text too short for them fails before any sweep runs
    fit, held_windows = _fit_and_heldout(model, tokenizer, windows, config)
    journals = resume_files(out_dir, (DROP_JOURNAL, GREEDY_JOURNAL), run.resume)
    analysis = analyze(model, config=_sweep_config(config, remove, journals), windows=windows, stack=stack,
                       run=dataclasses.replace(run, resume=False))
    if analysis.summary["interrupted"]:  # finished drop batches are journaled: the caller says how to resume
        raise KeyboardInterrupt
    if analysis.summary.get("unsupported"):  # the first refused sweep names the reason
        name, reason = next(iter(analysis.summary["unsupported"].items()))
        raise DepthprobeError(f"prune scores blocks by removing them, and the {name} sweep is {reason}")
    evaluator = Evaluator(stack, windows.input_ids, batch_size=analysis.summary["config"]["batch_size"])
    remove, table = _choose(evaluator, analysis, remove, k, config, run.progress, journals.get(GREEDY_JOURNAL))
    loss_before, loss_after = evaluator.loss(), evaluator.loss(remove)
    log.info("removing blocks %s (%s): loss %.4f -> %.4f", sorted(remove), config.strategy, loss_before, loss_after)
    held, scored = None, {}
    if config.heldout and held_windows is not None:
        held, table, scored = _heldout(stack, windows, held_windows, remove, table, evaluator.batch_size, run.progress)
    report = _close_seam(model, tokenizer, stack, remove, config, (table, fit, held_windows, scored), run.progress,
                         out_dir)
    excess = prune_excess(table) if table is not None else None
    table = merge_curve(table, report, config.strategy)
    result = PruneResult(sorted(remove), config.strategy, loss_before, loss_after, analysis.summary["objective"],
                         table, analysis, excess, held, report)
    result.pruned_analysis = analyze_pruned(model, windows, analysis, sorted(remove), run.progress)
    if out_dir is not None:
        _save(result, model, tokenizer, out_dir, journals)
    return result


def _sweep_config(config: PruneConfig, remove, journals: dict) -> ProbeConfig:
    """The analysis prune chooses from: angular, plus single-block drops when a curve or the
    drop strategy needs them (sublayer and contiguous sweeps skipped), journaled in --out."""
    needs_drop = config.curve or (remove is None and config.strategy == "drop")
    given = config.probe.options
    drop_file = str(journals[DROP_JOURNAL]) if journals else given.drop.progress_file
    options = dataclasses.replace(given, drop=dataclasses.replace(given.drop, sublayers=False, block_sizes=(),
                                                                  progress_file=drop_file))
    # the windows are made here, so the analysis records no text source of its own
    return dataclasses.replace(config.probe, metrics="angular,drop" if needs_drop else "angular", text_file=None,
                               dataset=None, options=options)


def _close_seam(model: torch.nn.Module, tokenizer, stack: LayerStack, remove: list[int], config: PruneConfig,
                scoring: tuple, progress: bool, out_dir) -> SeamReport | None:
    """Remove the blocks; with ``config.seam``, repair before and heal after, scored on the
    held-out windows (:mod:`depthprobe.prune.seam`). ``scoring``: (curve, fit windows,
    held-out windows, held-out losses already measured)."""
    table, fit, held_windows, scored = scoring
    seam = config.seam
    if seam is None:
        remove_blocks(stack, remove)
        return None
    report = before_removal(model, remove, curve_steps(table, config.strategy, remove), fit, held_windows, seam,
                            scored=scored, progress=progress)
    remove_blocks(stack, remove)
    after_removal(model, tokenizer, remove, report, seam, checkpoint_dir=out_dir, progress=progress)
    return report


def _fit_and_heldout(model: torch.nn.Module, tokenizer, windows: Windows,
                     config: PruneConfig) -> tuple[Windows, Windows | None]:
    """The repair-fit windows (the calibration ones without ``--repair``) and the held-out
    windows, disjoint from both (None for encoders, or with neither ``heldout`` nor ``seam``)."""
    seam = config.seam
    if seam is not None:
        check_causal(model, seam)
    fit = fit_windows(tokenizer, windows, seam, max_positions(model)) if seam is not None else windows
    if not ((config.heldout or seam is not None) and LayerStack.from_model(model).is_causal_lm):
        return fit, None
    if config.heldout_windows < 1:
        raise DepthprobeError(f"--heldout-windows must be at least 1 (got {config.heldout_windows})")
    return fit, heldout_windows(tokenizer, num_sequences=config.heldout_windows, seq_len=fit.seq_len,
                                calibration=fit, text_file=config.eval_text_file, dataset=config.eval_dataset,
                                max_positions=max_positions(model))


def _validated(model: torch.nn.Module, config: PruneConfig):
    """``(stack, remove or None, K)`` after checking the request against the model."""
    remove, num_layers, strategy = config.remove, config.num_layers, config.strategy
    if (remove is None) == (num_layers is None):
        raise DepthprobeError("give either --remove LAYERS or --num-layers K (not both)")
    if strategy not in (*STRATEGIES, "manual"):
        raise DepthprobeError(f"unknown --strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    stack = LayerStack.from_model(model, config.probe.layers_path)
    if not isinstance(getattr(stack.layer_config, "num_hidden_layers", None), int):
        raise DepthprobeError(f"cannot remove blocks from {type(model).__name__}: its config has no num_hidden_layers")
    if config.curve and config.curve_max is not None and config.curve_max >= len(stack):
        raise DepthprobeError(f"--curve-max must be below the {len(stack)} blocks of this model "
                              f"(got {config.curve_max})")
    if remove is not None:
        remove = validate_removal(stack, remove)
        return stack, remove, len(remove)
    return stack, None, validate_k(stack, num_layers)


def _choose(evaluator: Evaluator, analysis: AnalysisResult, remove, k: int, config: PruneConfig, progress: bool,
            greedy_journal) -> tuple[list[int], pd.DataFrame | None]:
    """The blocks to remove (given, or by ``config.strategy``) and, with ``config.curve``,
    every strategy's curve."""
    steps, curve, curve_max = None, config.curve, config.curve_max
    if remove is None:
        if config.strategy == "greedy":
            steps = greedy(evaluator, k if not curve else max(k, curve_max or k), progress,
                           progress_file=greedy_journal)
            remove = steps[k].removed
        else:
            remove = choose(config.strategy, k, analysis.layers, analysis.angular_distance, evaluator, progress)
    table = None
    if curve:
        table = prune_curve(evaluator, analysis.layers, analysis.angular_distance, curve_max or k,
                            greedy_steps=steps, progress=progress)
    return remove, table


def analyze_pruned(model: torch.nn.Module, windows: Windows, original: AnalysisResult, removed: list[int],
                   progress: bool = True) -> AnalysisResult:
    """The pruned (and repaired or healed) model's own angular and variance diagnostics on the
    windows that chose the blocks: one forward pass (its ``base_loss`` is the calibration loss
    after pruning)."""
    config = original.summary["config"]
    probe = ProbeConfig(metrics="angular,variance", batch_size=config["batch_size"], layers_path=config["layers_path"])
    name = f"{original.summary['model']} without blocks {', '.join(map(str, removed))}"
    result = analyze(model, config=probe, windows=windows, run=RunOptions(progress=progress, loss=True, model_name=name))
    result.summary["pruned_from"] = {"model": original.summary["model"], "removed": removed,
                                     "num_layers": original.num_layers}
    return result


def _windows(model: torch.nn.Module, tokenizer, probe: ProbeConfig) -> Windows:
    """The calibration windows of ``probe``."""
    return make_windows(tokenizer, num_sequences=probe.num_sequences, seq_len=probe.seq_len,
                        text_file=probe.text_file, dataset=probe.dataset, max_positions=max_positions(model))


def _save(result: PruneResult, model: torch.nn.Module, tokenizer, out_dir: str | Path, journals: dict) -> None:
    """The pruned model, ``prune.json``, the curve tables and ``analysis/``."""
    out = save_model(model, tokenizer, out_dir)
    write_json(out / PRUNE_JSON, {**result.summary(), "model": result.analysis.summary["model"]})
    if result.curve is not None:
        atomic_to_csv(result.curve, out / PRUNE_CURVE_CSV, index=False, float_format="%.10g")
        atomic_to_csv(result.excess, out / PRUNE_EXCESS_CSV, index=False, float_format="%.10g")
    else:  # --force into an older prune folder: its curve would describe another pruning
        for stale in (PRUNE_CURVE_CSV, PRUNE_EXCESS_CSV):
            (out / stale).unlink(missing_ok=True)
    # analysis/ describes the model this folder holds; original/ the one the blocks were chosen from
    (result.pruned_analysis or result.analysis).save(out / ANALYSIS_DIR)
    result.analysis.save(out / ORIGINAL_DIR)
    if result.seam is not None:
        result.seam.save(out)
    for journal in journals.values():  # everything is saved: nothing left to resume
        journal.unlink(missing_ok=True)


def _heldout(stack, windows, held, remove, table, batch_size, progress):
    """Held-out scores of the full and pruned model (and of every curve row) before removal:
    the summary, the curve with held-out columns, and each removal's held-out loss."""
    removals = [[], list(remove)]
    if table is not None:
        removals += [[int(v) for v in str(r).split(";") if v != ""] for r in table["removed"]]
    scores = score_removals(stack, windows, held, removals, batch_size, progress)
    if table is not None:
        table = add_heldout_columns(table, scores)
    scored = {removed: score.heldout_loss for removed, score in scores.items()}
    return heldout_summary(scores[()], scores[tuple(sorted(remove))], held), table, scored
