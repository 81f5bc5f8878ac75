"""Side by side, a pruned run is drawn on its original model's block indices.

A prune renumbers the blocks it keeps (pruned layer 21 is original 24), so a pruned run put
beside its original would look shifted, with a spike where blocks were removed. Its summary
knows the map (``pruned_from``: the original's block count and the removed blocks); here the
pruned run's per-layer table gets one row per *original* block: kept blocks carry their
values and their new index (``pruned_layer``), removed blocks are empty rows (gaps in every
line) and are shaded and marked in the figures. Findings quote original indices with the
pruned index in brackets: ``layer 24 [21]``.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from depthprobe.results import AnalysisResult

#: the column holding a kept block's index in the pruned model
PRUNED_LAYER = "pruned_layer"


def kept_blocks(run: AnalysisResult) -> list[int] | None:
    """Original index of each block of a pruned run (None for a run that was not pruned)."""
    source = run.summary.get("pruned_from")
    if not source or "num_layers" not in source:
        return None
    removed = set(source.get("removed", []))
    kept = [i for i in range(int(source["num_layers"])) if i not in removed]
    return kept if len(kept) == len(run.layers) else None


def removed_blocks(run: AnalysisResult) -> list[int]:
    """Original indices of the blocks a pruned run no longer has (empty for another run)."""
    return sorted(run.summary.get("pruned_from", {}).get("removed", [])) if kept_blocks(run) is not None else []


def aligned(run: AnalysisResult) -> AnalysisResult:
    """``run`` with its per-layer table on original block indices (module docs); other runs
    are returned unchanged."""
    kept = kept_blocks(run)
    if kept is None:
        return run
    n = int(run.summary["pruned_from"]["num_layers"])
    table = run.layers.drop(columns=["layer"]).copy()
    table.insert(0, PRUNED_LAYER, np.arange(len(kept), dtype=float))
    table.index = kept
    table = table.reindex(range(n))  # removed blocks: rows of NaN, drawn as gaps
    table.insert(0, "layer", np.arange(n))
    return dataclasses.replace(run, layers=table.reset_index(drop=True), tables=dict(run.tables))


_LAYER_REF = re.compile(r"\b(layers?) (\d+)(?:–(\d+))?")


def original_indices(sentence: str, kept: list[int]) -> str:
    """``layer 21`` -> ``layer 24 [21]`` and ``layers 3–5`` -> ``layers 3–7 [3–5]`` for a pruned
    run whose kept blocks are ``kept`` (original indices, in order)."""

    def swap(match: re.Match) -> str:
        word, first, last = match.group(1), int(match.group(2)), match.group(3)
        if first >= len(kept) or (last is not None and int(last) >= len(kept)):
            return match.group(0)
        if last is None:
            return f"{word} {kept[first]} [{first}]"
        return f"{word} {kept[first]}–{kept[int(last)]} [{first}–{last}]"

    return _LAYER_REF.sub(swap, sentence)


def mark_removed(fig, runs: list[AnalysisResult], colors: list[str]) -> None:
    """Shade and label the removed blocks of every pruned run on each layer-axis panel."""
    if fig is None:
        return
    for i, run in enumerate(runs):
        gone = removed_blocks(run)
        if not gone:
            continue
        for ax in fig.axes:
            if ax.get_xlabel() != "layer":
                continue
            for block in gone:
                ax.axvspan(block - 0.5, block + 0.5, color=colors[i % len(colors)], alpha=0.12, lw=0)
            top = ax.get_ylim()[1]
            for block in gone:
                ax.text(block, top, "×", ha="center", va="top", fontsize=8, color=colors[i % len(colors)])
        fig.text(0.01, 0.005, f"shaded ×: blocks removed in {run.summary.get('model', 'the pruned run')}",
                 fontsize=8, color="#555")
