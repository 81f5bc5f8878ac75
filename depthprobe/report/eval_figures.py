"""Figures and report sections for held-out loss, lm-eval scores and speed (``evaluate/``).

Kept apart from ``figures.py`` / ``html.py``; ``html.render`` calls :func:`sections` once.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]

#: csv files of a run folder the report reads into ``result.tables`` (name without .csv)
TABLES = ("eval", "eval_retention", "bench", "bench_speedup")


def plot_heldout_curve(curve: pd.DataFrame) -> Figure | None:
    """Calibration (solid) and held-out (dashed) loss against blocks removed, per strategy,
    with bootstrap intervals over windows as bands."""
    if curve is None or "heldout_loss" not in curve:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for j, strategy in enumerate(sorted(set(curve["strategy"]))):
        part = curve[curve["strategy"] == strategy].sort_values("num_removed")
        color = COLORS[j % len(COLORS)]
        k = part["num_removed"]
        ax.plot(k, part["loss"], color=color, marker="o", ms=3, label=f"{strategy} (calibration)")
        ax.plot(k, part["heldout_loss"], color=color, marker="s", ms=3, ls="--", label=f"{strategy} (held-out)")
        if "loss_low" in part:
            ax.fill_between(k, part["loss_low"], part["loss_high"], color=color, alpha=0.12, lw=0)
        ax.fill_between(k, part["heldout_loss_low"], part["heldout_loss_high"], color=color, alpha=0.12, lw=0)
    ax.set_xlabel("blocks removed")
    ax.set_ylabel("loss (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def plot_eval(table: pd.DataFrame) -> Figure | None:
    """Score per task and metric, one bar per model, with ±1 stderr."""
    if table is None or table.empty:
        return None
    table = table.assign(key=table["task"] + " " + table["metric"])
    keys = list(dict.fromkeys(table["key"]))
    models = list(dict.fromkeys(table["model"]))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(keys) * len(models) ** 0.5), 3.4))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        part = table[table["model"] == model].set_index("key").reindex(keys)
        xs = [k + (i - (len(models) - 1) / 2) * width for k in range(len(keys))]
        ax.bar(xs, part["value"], width, yerr=part["stderr"].fillna(0), color=COLORS[i % len(COLORS)],
               label=str(model), capsize=2)
    ax.set_xticks(range(len(keys)), keys, fontsize=8)
    ax.set_ylabel("score")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_bench(table: pd.DataFrame) -> Figure | None:
    """Prefill and decode tokens/s per batch size x prompt length, one bar per model."""
    if table is None or table.empty:
        return None
    table = table.assign(shape="B=" + table["batch_size"].astype(str) + " T=" + table["prompt_len"].astype(str))
    shapes = list(dict.fromkeys(table["shape"]))
    models = list(dict.fromkeys(table["model"]))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    width = 0.8 / len(models)
    for ax, column, title in zip(axes, ("prefill_tokens_per_s", "decode_tokens_per_s"), ("prefill", "decode"),
                                 strict=True):
        for i, model in enumerate(models):
            part = table[table["model"] == model].set_index("shape").reindex(shapes)
            xs = [k + (i - (len(models) - 1) / 2) * width for k in range(len(shapes))]
            ax.bar(xs, part[column], width, color=COLORS[i % len(COLORS)], label=str(model))
        ax.set_xticks(range(len(shapes)), shapes, fontsize=7)
        ax.set_title(f"{title} tokens/s", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def sections(runs: Sequence, figure_html, table_html) -> list[str]:
    """HTML sections for every run that holds held-out, eval or bench results."""
    parts = []
    for run in runs:
        label = html.escape(str(run.summary.get("label") or run.summary.get("model") or ""))
        curve = run.tables.get("prune_curve")
        fig = plot_heldout_curve(curve)
        if fig is not None:
            parts.append(f"<h2>Calibration vs held-out loss — {label}</h2>" + figure_html(
                fig, "Solid: loss on the calibration windows that chose the blocks; dashed: on held-out windows "
                "never used to choose. Bands: 95% bootstrap intervals over windows.", "held-out pruning curve"))
        if "eval" in run.tables:
            parts.append(f"<h2>Task scores (lm-eval-harness) — {label}</h2>"
                         + figure_html(plot_eval(run.tables["eval"]), "Bars: score; whiskers: ±1 stderr.",
                                       "task scores") + table_html(run.tables["eval"]))
        if "eval_retention" in run.tables:
            parts.append("<p class='meta'>Retention: score / the first model's, 95% paired bootstrap interval "
                         "over documents.</p>" + table_html(run.tables["eval_retention"]))
        if "bench" in run.tables:
            parts.append(f"<h2>Speed — {label}</h2>" + figure_html(
                plot_bench(run.tables["bench"]), "Median of repeated runs; prefill builds the KV cache, decode is "
                "greedy one token at a time with it.", "speed") + table_html(run.tables["bench"]))
        if "bench_speedup" in run.tables:
            parts.append(table_html(run.tables["bench_speedup"]))
    return parts
