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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from depthprobe.analysis import analyze, max_positions
from depthprobe.data import Windows, heldout_windows, make_windows
from depthprobe.errors import DepthprobeError
from depthprobe.evaluate.heldout import add_heldout_columns, heldout_summary, score_removals
from depthprobe.journal import resume_files
from depthprobe.model.stack import LayerStack
from depthprobe.probes.sweep import SweepOptions
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
from depthprobe.results import (
    ANALYSIS_DIR,
    ORIGINAL_DIR,
    PRUNE_CURVE_CSV,
    PRUNE_EXCESS_CSV,
    PRUNE_JSON,
    AnalysisResult,
    write_json,
)
from depthprobe.safeio import atomic_to_csv
from depthprobe.stats import prune_excess

#: journals of an unfinished prune in its --out folder (removed once the model is saved)
DROP_JOURNAL = "drop_progress.jsonl"
GREEDY_JOURNAL = "greedy_progress.jsonl"
#: held-out windows a pruned model is scored on (of the calibration length)
HELDOUT_WINDOWS = 16

__all__ = [
    "STRATEGIES", "HealConfig", "PruneResult", "RepairConfig", "SeamOptions", "heal_lora", "prune", "remove_blocks",
    "repair_linear", "save_model",
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
    *,
    remove: Sequence[int] | None = None,
    num_layers: int | None = None,
    strategy: str = "greedy",
    curve: bool = True,
    curve_max: int | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    resume: bool = False,
    heldout: bool = True,
    eval_text_file: str | None = None,
    eval_dataset: str | None = None,
    heldout_windows: int = HELDOUT_WINDOWS,
    seam: SeamOptions | None = None,
    **analyze_kwargs,
) -> PruneResult:
    """Choose blocks (``remove`` explicitly, or ``num_layers`` by ``strategy``), measure the
    pruning curve of every strategy, remove the blocks in place and (with ``out_dir``) save.

    With ``heldout`` (default; causal LMs), the curve and the summary also carry the loss on
    ``heldout_windows`` held-out windows (``eval_text_file`` / ``eval_dataset``, default the
    built-in text's tail, never the calibration or repair-fit windows), with bootstrap
    intervals over windows; ``seam`` (repair / heal) is scored on the same windows. With
    ``out_dir``, finished drop-sweep batches and greedy steps are journaled there until the
    model is saved; ``resume=True`` continues from them after a crash or a kill.

    Example:
        >>> model, tok = depthprobe.load_model("smollm2")                                   # doctest: +SKIP
        >>> r = prune(model, tok, num_layers=6, strategy="greedy", out_dir="runs/smol-24")  # doctest: +SKIP
        >>> r.removed, r.loss_before, r.loss_after                                        # doctest: +SKIP
    """
    stack, remove, k = _validated(model, remove, num_layers, strategy, analyze_kwargs.get("layers_path"))
    windows = _windows(model, tokenizer, analyze_kwargs)
    # fit and held-out windows first: text too short for them fails before any sweep runs
    fit, held_windows = _fit_and_heldout(model, tokenizer, windows, seam, heldout,
                                         (eval_text_file, eval_dataset, heldout_windows))
    needs_drop = curve or (remove is None and strategy == "drop")
    # the curve needs single-block drops only: sublayer and contiguous sweeps are skipped
    given = SweepOptions.parse(analyze_kwargs.pop("options", None))
    journals = resume_files(out_dir, (DROP_JOURNAL, GREEDY_JOURNAL), resume)
    drop_file = str(journals[DROP_JOURNAL]) if journals else given.drop.progress_file
    options = dataclasses.replace(given, drop=dataclasses.replace(given.drop, sublayers=False, block_sizes=(),
                                                                  progress_file=drop_file))
    analysis = analyze(model, windows=windows, metrics="angular,drop" if needs_drop else "angular", stack=stack,
                       progress=progress, options=options, **analyze_kwargs)
    evaluator = Evaluator(stack, windows.input_ids, batch_size=analysis.summary["config"]["batch_size"])
    remove, table = _choose(evaluator, analysis, remove, k, strategy, curve, curve_max, progress,
                            journals.get(GREEDY_JOURNAL))
    loss_before = evaluator.loss()
    loss_after = evaluator.loss(remove)
    log.info("removing blocks %s (%s): loss %.4f -> %.4f", sorted(remove), strategy, loss_before, loss_after)
    held, table, scored = (_heldout(stack, windows, held_windows, remove, table, evaluator.batch_size, progress)
                           if heldout and held_windows is not None else (None, table, {}))
    # repair / heal, scored on the same held-out windows (depthprobe.prune.seam)
    report = (before_removal(model, remove, curve_steps(table, strategy, remove), fit, held_windows, seam,
                             scored=scored, progress=progress) if seam is not None else None)
    remove_blocks(stack, remove)
    if report is not None:
        after_removal(model, tokenizer, remove, report, seam, checkpoint_dir=out_dir, progress=progress)
    excess = prune_excess(table) if table is not None else None
    table = merge_curve(table, report, strategy)
    result = PruneResult(sorted(remove), strategy, loss_before, loss_after, analysis.summary["objective"], table,
                         analysis, excess, held, report)
    result.pruned_analysis = analyze_pruned(model, windows, analysis, sorted(remove), progress)
    if out_dir is not None:
        _save(result, model, tokenizer, out_dir, journals)
    return result


def _fit_and_heldout(model: torch.nn.Module, tokenizer, windows: Windows, seam: SeamOptions | None, heldout: bool,
                     held_args: tuple) -> tuple[Windows, Windows | None]:
    """The repair-fit windows (the calibration ones without ``--repair``) and the held-out
    windows, disjoint from both (None for encoders, or with neither ``heldout`` nor ``seam``)."""
    text_file, dataset, num = held_args
    if seam is not None:
        check_causal(model, seam)
    fit = fit_windows(tokenizer, windows, seam, max_positions(model)) if seam is not None else windows
    if not ((heldout or seam is not None) and LayerStack.from_model(model).is_causal_lm):
        return fit, None
    if num < 1:
        raise DepthprobeError(f"--heldout-windows must be at least 1 (got {num})")
    return fit, heldout_windows(tokenizer, num_sequences=num, seq_len=fit.seq_len, calibration=fit,
                                text_file=text_file, dataset=dataset, max_positions=max_positions(model))


def _validated(model: torch.nn.Module, remove, num_layers, strategy: str, layers_path):
    """``(stack, remove or None, K)`` after checking the request against the model."""
    if (remove is None) == (num_layers is None):
        raise DepthprobeError("give either --remove LAYERS or --num-layers K (not both)")
    if strategy not in (*STRATEGIES, "manual"):
        raise DepthprobeError(f"unknown --strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    stack = LayerStack.from_model(model, layers_path)
    if not isinstance(getattr(stack.layer_config, "num_hidden_layers", None), int):
        raise DepthprobeError(f"cannot remove blocks from {type(model).__name__}: its config has no num_hidden_layers")
    if remove is not None:
        remove = validate_removal(stack, remove)
        return stack, remove, len(remove)
    return stack, None, validate_k(stack, num_layers)


def _choose(evaluator: Evaluator, analysis: AnalysisResult, remove, k: int, strategy: str, curve: bool,
            curve_max: int | None, progress: bool, greedy_journal) -> tuple[list[int], pd.DataFrame | None]:
    """The blocks to remove (given, or by ``strategy``) and, with ``curve``, every strategy's curve."""
    steps = None
    if remove is None:
        if strategy == "greedy":
            steps = greedy(evaluator, k if not curve else max(k, curve_max or k), progress,
                           progress_file=greedy_journal)
            remove = steps[k].removed
        else:
            remove = choose(strategy, k, analysis.layers, analysis.angular_distance, evaluator, progress)
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
    result = analyze(model, windows=windows, metrics="angular,variance", batch_size=config["batch_size"],
                     layers_path=config["layers_path"], progress=progress, loss=True,
                     model_name=f"{original.summary['model']} without blocks {', '.join(map(str, removed))}")
    result.summary["pruned_from"] = {"model": original.summary["model"], "removed": removed,
                                     "num_layers": original.num_layers}
    return result


def _windows(model: torch.nn.Module, tokenizer, analyze_kwargs: dict) -> Windows:
    """The calibration windows from ``analyze`` keyword arguments (those used are removed)."""
    windows = analyze_kwargs.pop("windows", None)
    if windows is not None:
        return windows
    return make_windows(
        tokenizer,
        num_sequences=analyze_kwargs.pop("num_sequences", 8),
        seq_len=analyze_kwargs.pop("seq_len", 256),
        text_file=analyze_kwargs.pop("text_file", None),
        dataset=analyze_kwargs.pop("dataset", None),
        max_positions=max_positions(model),
    )


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
