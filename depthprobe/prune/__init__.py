"""Drop sweeps, layer choice and export of a pruned model.

    sweep.py   drop_delta_loss (block, attention, MLP) and contiguous-block drops, prefix-cached
    select.py  strategies drop | greedy | angular | block-influence | block, pruning curves
               (and ``depthprobe.stats.prune_excess``: each strategy's loss against greedy's)
    export.py  remove blocks for good, save a model that loads with from_pretrained

:func:`prune` wires them: analyze -> choose -> curve -> remove -> verify -> save.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from depthprobe.errors import DepthprobeError
from depthprobe.prune.export import remove_blocks, save_model
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
from depthprobe.stats import prune_excess

log = logging.getLogger(__name__)

__all__ = ["STRATEGIES", "PruneResult", "prune", "remove_blocks", "save_model"]


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
    **analyze_kwargs,
) -> PruneResult:
    """Choose blocks (``remove`` explicitly, or ``num_layers`` by ``strategy``), measure the
    pruning curve of every strategy, remove the blocks in place and (with ``out_dir``) save.

    Example:
        >>> model, tok = depthprobe.load_model("smollm2")                                   # doctest: +SKIP
        >>> r = prune(model, tok, num_layers=6, strategy="greedy", out_dir="runs/smol-24")  # doctest: +SKIP
        >>> r.removed, r.loss_before, r.loss_after                                        # doctest: +SKIP
    """
    from depthprobe.analysis import analyze, max_positions
    from depthprobe.data import make_windows
    from depthprobe.model.stack import LayerStack

    if (remove is None) == (num_layers is None):
        raise DepthprobeError("give either --remove LAYERS or --num-layers K (not both)")
    if strategy not in (*STRATEGIES, "manual"):
        raise DepthprobeError(f"unknown --strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    stack = LayerStack.from_model(model, analyze_kwargs.get("layers_path"))
    if remove is not None:
        remove = validate_removal(stack, remove)
        k = len(remove)
    else:
        k = validate_k(stack, num_layers)
    if not isinstance(getattr(getattr(model, "config", None), "num_hidden_layers", None), int):
        raise DepthprobeError(f"cannot remove blocks from {type(model).__name__}: its config has no num_hidden_layers")

    windows = analyze_kwargs.pop("windows", None)
    if windows is None:
        windows = make_windows(
            tokenizer,
            num_sequences=analyze_kwargs.pop("num_sequences", 8),
            seq_len=analyze_kwargs.pop("seq_len", 256),
            text_file=analyze_kwargs.pop("text_file", None),
            dataset=analyze_kwargs.pop("dataset", None),
            max_positions=max_positions(model),
        )
    needs_drop = curve or (remove is None and strategy == "drop")
    # the curve needs single-block drops only: sublayer and contiguous sweeps are skipped
    options = {**analyze_kwargs.pop("options", {}), "sublayers": False, "block_sizes": ()}
    analysis = analyze(model, windows=windows, metrics="angular,drop" if needs_drop else "angular", stack=stack,
                       progress=progress, options=options, **analyze_kwargs)
    evaluator = Evaluator(stack, windows.input_ids, batch_size=analysis.summary["config"]["batch_size"])
    steps = None
    if remove is None:
        if strategy == "greedy":
            steps = greedy(evaluator, k if not curve else max(k, curve_max or k), progress)
            remove = steps[k].removed
        else:
            remove = choose(strategy, k, analysis.layers, analysis.angular_distance, evaluator, progress)
    table = None
    if curve:
        table = prune_curve(evaluator, analysis.layers, analysis.angular_distance, curve_max or k,
                            greedy_steps=steps, progress=progress)
    loss_before = evaluator.loss()
    loss_after = evaluator.loss(remove)
    remove_blocks(stack, remove)
    excess = prune_excess(table) if table is not None else None
    result = PruneResult(sorted(remove), strategy, loss_before, loss_after, analysis.summary["objective"], table,
                         analysis, excess)
    log.info("removed blocks %s (%s): loss %.4f -> %.4f", sorted(remove), strategy, loss_before, loss_after)
    result.pruned_analysis = analyze_pruned(model, windows, analysis, sorted(remove), progress)
    if out_dir is not None:
        out = save_model(model, tokenizer, out_dir)
        write_json(out / "prune.json", {**result.summary(), "model": analysis.summary["model"]})
        if table is not None:
            table.to_csv(out / "prune_curve.csv", index=False, float_format="%.10g")
            excess.to_csv(out / "prune_excess.csv", index=False, float_format="%.10g")
        else:  # --force into an older prune folder: its curve would describe another pruning
            for stale in ("prune_curve.csv", "prune_excess.csv"):
                (out / stale).unlink(missing_ok=True)
        # analysis/ describes the model this folder holds; original/ the one blocks were chosen from
        result.pruned_analysis.save(out / "analysis")
        analysis.save(out / "original")
    return result


def analyze_pruned(model: torch.nn.Module, windows, original: AnalysisResult, removed: list[int],
                   progress: bool = True) -> AnalysisResult:
    """The pruned model's own angular and variance diagnostics on the windows that chose the
    blocks: one forward pass (its ``base_loss`` is the calibration loss after pruning)."""
    from depthprobe.analysis import analyze

    config = original.summary["config"]
    result = analyze(model, windows=windows, metrics="angular,variance", batch_size=config["batch_size"],
                     layers_path=config["layers_path"], progress=progress,
                     model_name=f"{original.summary['model']} without blocks {', '.join(map(str, removed))}")
    result.summary["pruned_from"] = {"model": original.summary["model"], "removed": removed,
                                     "num_layers": original.num_layers}
    return result
