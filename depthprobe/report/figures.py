"""Matplotlib figures of one or several runs, usable from notebooks and by the HTML report.

Every function takes one run (``AnalysisResult``) or a list of runs and returns a
``matplotlib.figure.Figure`` or ``None`` when the runs hold no data for it. Runs keep the
same color in every figure.

Example:
    >>> from depthprobe.report import plot_layers                 # doctest: +SKIP
    >>> fig = plot_layers([result], ["angular_distance"])        # doctest: +SKIP
    >>> fig.savefig("angular.png")                               # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from depthprobe.errors import DepthprobeError  # noqa: E402
from depthprobe.results import AnalysisResult  # noqa: E402

COLORS = ["#1f5fa8", "#d1495b", "#2e9e6a", "#edae49", "#6a4c93", "#00798c", "#8d6a4f", "#555555"]
LABELS = {
    "angular_distance": "angular distance d(x_l, x_l+1)",
    "block_influence": "block influence 1 − cos",
    "activation_variance": "activation variance",
    "activation_rms": "activation RMS",
    "max_abs_activation": "max |activation|",
    "grad_norm": "grad norm (block)",
    "grad_norm_attn": "grad norm (attention)",
    "grad_norm_mlp": "grad norm (MLP)",
    "logit_lens_loss": "logit-lens loss",
    "drop_delta_loss": "Δ loss, block dropped",
    "drop_delta_loss_attn": "Δ loss, attention dropped",
    "drop_delta_loss_mlp": "Δ loss, MLP dropped",
    "attribution": "attribution share",
    "spectra_alpha": "weight ESD power-law α (block mean)",
    "spectra_stable_rank": "weight stable rank (block mean)",
    "spectra_alpha_weighted": "α · log10 λ_max (block mean)",
    "spectra_spectral_norm": "λ_max = σ_max² (block mean)",
}
LOG_SCALE = {"activation_variance", "activation_rms", "max_abs_activation", "grad_norm", "grad_norm_attn",
             "grad_norm_mlp", "spectra_spectral_norm"}


def run_label(result: AnalysisResult) -> str:
    return str(result.summary.get("label") or result.summary.get("model") or "run")


def _style(ax, xlabel="layer", ylabel=None):
    ax.grid(True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_xlabel(xlabel)
    if xlabel in ("layer", "blocks removed"):  # small models: no tick at layer 2.5
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ylabel:
        ax.set_ylabel(ylabel)


def as_runs(runs: AnalysisResult | Sequence[AnalysisResult]) -> list[AnalysisResult]:
    """A single result or a list of them, as a list (notebook users pass one result)."""
    return [runs] if isinstance(runs, AnalysisResult) else list(runs)


def _has(run: AnalysisResult, column: str) -> bool:
    return column in run.layers and run.layers[column].notna().any()


def note_missing(fig: Figure, runs: Sequence[AnalysisResult], columns: Sequence[str]) -> None:
    """Say under the figure which runs were not drawn because they lack every one of ``columns``."""
    absent = [run_label(r) for r in runs if not any(_has(r, c) for c in columns)]
    if absent and len(absent) < len(runs):
        fig.text(0.01, -0.02, "not measured in: " + ", ".join(absent), fontsize=8, color="#555555",
                 va="top", ha="left")


def _present(runs: Sequence[AnalysisResult], column: str) -> bool:
    return any(column in r.layers and r.layers[column].notna().any() for r in runs)


def plot_layers(runs: AnalysisResult | Sequence[AnalysisResult], columns: Sequence[str], title: str | None = None) -> Figure | None:
    """One panel per column, x = layer, one line per run (dashes tell sublayer columns apart).

    Raises ``DepthprobeError`` for a column that is neither a depthprobe metric nor in any run.
    """
    runs = as_runs(runs)
    unknown = [c for c in columns if c not in LABELS and not any(c in r.layers for r in runs)]
    if unknown:
        available = sorted({c for r in runs for c in r.layers.columns if c != "layer"})
        raise DepthprobeError(f"no column {', '.join(map(repr, unknown))} in these runs; "
                              f"choose from {', '.join(available)}")
    requested = list(columns)
    columns = [c for c in columns if _present(runs, c)]
    if not columns:
        return None
    fig, axes = plt.subplots(1, len(columns), figsize=(4.6 * len(columns), 3.3), squeeze=False)
    for ax, column in zip(axes[0], columns, strict=True):
        for i, run in enumerate(runs):
            if column in run.layers:
                ax.plot(run.layers["layer"], run.layers[column], marker="o", ms=3, lw=1.6,
                        color=COLORS[i % len(COLORS)], label=run_label(run))
        if column in LOG_SCALE:
            ax.set_yscale("log")
        _style(ax, ylabel=LABELS.get(column, column))
        ax.set_title(LABELS.get(column, column), fontsize=10)
    if len(runs) > 1:
        axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    note_missing(fig, runs, requested)
    return fig


def plot_grad_norms(runs: AnalysisResult | Sequence[AnalysisResult]) -> Figure | None:
    """Gradient norm per layer: block total (solid), attention (dashed), MLP (dotted)."""
    runs = as_runs(runs)
    if not _present(runs, "grad_norm"):
        return None
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    for i, run in enumerate(runs):
        color = COLORS[i % len(COLORS)]
        for column, style in (("grad_norm", "-"), ("grad_norm_attn", "--"), ("grad_norm_mlp", ":")):
            if column in run.layers:
                # several runs: one legend entry per run (its color) plus one per line style
                label = LABELS[column] if len(runs) == 1 else run_label(run) if style == "-" else None
                ax.plot(run.layers["layer"], run.layers[column], style, color=color, lw=1.6, label=label,
                        marker="o" if style == "-" else None, ms=3)
    ax.set_yscale("log")
    _style(ax, ylabel="L2 norm of gradients")
    if len(runs) == 1:
        ax.legend(fontsize=8)
    else:
        for column, style in (("grad_norm", "-"), ("grad_norm_attn", "--"), ("grad_norm_mlp", ":")):
            ax.plot([], [], style, color="#555555", label=LABELS[column])
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    note_missing(fig, runs, ["grad_norm"])
    return fig


def plot_lens(runs: AnalysisResult | Sequence[AnalysisResult]) -> Figure | None:
    """Logit-lens loss per layer with each run's full-model loss as a horizontal line."""
    runs = as_runs(runs)
    if not _present(runs, "logit_lens_loss"):
        return None
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    for i, run in enumerate(runs):
        color = COLORS[i % len(COLORS)]
        if not _has(run, "logit_lens_loss"):  # runs with other metric sets side by side
            continue
        ax.plot(run.layers["layer"], run.layers["logit_lens_loss"], marker="o", ms=3, color=color,
                label=run_label(run))
        base = run.summary.get("base_loss")
        if base is not None:
            ax.axhline(base, color=color, ls="--", lw=1, alpha=0.7)
    objective = runs[0].summary.get("objective", "lm_loss")
    _style(ax, ylabel="LM loss (nats)" if objective == "lm_loss" else "cosine drift of the final state")
    if len(runs) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    note_missing(fig, runs, ["logit_lens_loss"])
    return fig


def plot_angular_heatmap(runs: AnalysisResult | Sequence[AnalysisResult]) -> Figure | None:
    """Angular distance d(x_l, x_{l+n}): start layer l (y) × block size n (x), one panel per run."""
    runs = [r for r in as_runs(runs) if r.angular_distance is not None]
    if not runs:
        return None
    fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs), 4.4), squeeze=False)
    matrices = [run.angular_distance.to_numpy(dtype=float) for run in runs]
    # one colour scale for every panel: compared runs differ by large factors that
    # per-panel scales would hide
    values = np.concatenate([m[np.isfinite(m)] for m in matrices]) if matrices else np.array([])
    vmin, vmax = (float(values.min()), float(values.max())) if values.size else (None, None)
    for ax, run, matrix in zip(axes[0], runs, matrices, strict=True):
        image = ax.imshow(matrix, origin="lower", aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax,
                          extent=(0.5, matrix.shape[1] + 0.5, -0.5, matrix.shape[0] - 0.5))
        ax.set_xlabel("block size n")
        ax.set_ylabel("start layer l")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(run_label(run), fontsize=10)
        fig.colorbar(image, ax=ax, label="angular distance" + (" (one scale, all panels)" if len(runs) > 1 else ""))
    fig.tight_layout()
    return fig


def plot_drop(runs: AnalysisResult | Sequence[AnalysisResult]) -> Figure | None:
    """Loss increase when each block (or only its attention / MLP) is dropped, per layer."""
    all_runs = as_runs(runs)
    runs = [r for r in all_runs if "drop_delta_loss" in r.layers]
    if not runs:
        return None
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 3.2 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        layers = run.layers
        columns = [c for c in ("drop_delta_loss", "drop_delta_loss_attn", "drop_delta_loss_mlp")
                   if c in layers and layers[c].notna().any()]
        width = 0.8 / len(columns)
        for j, column in enumerate(columns):
            x = layers["layer"] + (j - (len(columns) - 1) / 2) * width
            yerr = None
            if column == "drop_delta_loss" and {"drop_delta_loss_lo", "drop_delta_loss_hi"} <= set(layers):
                yerr = np.vstack([layers[column] - layers["drop_delta_loss_lo"],
                                  layers["drop_delta_loss_hi"] - layers[column]]).clip(0)
            ax.bar(x, layers[column], width=width, label=LABELS[column], yerr=yerr, capsize=1.5,
                   color=["#1f5fa8", "#edae49", "#2e9e6a"][j])
        ax.set_yscale("symlog", linthresh=1e-3)
        _style(ax, ylabel="Δ loss (nats)")
        ax.set_title(run_label(run), fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    note_missing(fig, all_runs, ["drop_delta_loss"])
    return fig


def plot_block_drop(runs: AnalysisResult | Sequence[AnalysisResult]) -> Figure | None:
    """Gromov et al.: loss of removing blocks l..l+n−1 against d(x_l, x_{l+n}), per block size."""
    runs = [r for r in as_runs(runs) if "block_drop" in r.tables and len(r.tables["block_drop"])]
    if not runs:
        return None
    fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs), 3.6), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        table = run.tables["block_drop"]
        for j, (size, group) in enumerate(table.groupby("block_size")):
            ax.scatter(group["angular_distance"], group["delta_loss"], s=14, color=COLORS[j % len(COLORS)],
                       label=f"n = {size}")
        ax.set_yscale("symlog", linthresh=1e-2)
        _style(ax, xlabel="angular distance d(x_l, x_l+n)", ylabel="Δ loss, blocks l..l+n−1 removed")
        ax.set_title(run_label(run), fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_prune_curve(runs: AnalysisResult | Sequence[AnalysisResult]) -> Figure | None:
    """Loss after removing K blocks, one line per strategy (solid: first run, dashed: others)."""
    runs = [r for r in as_runs(runs) if "prune_curve" in r.tables]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    strategies = sorted({s for r in runs for s in r.tables["prune_curve"]["strategy"]})
    for i, run in enumerate(runs):
        curve = run.tables["prune_curve"]
        for j, strategy in enumerate(strategies):
            part = curve[curve["strategy"] == strategy]
            label = strategy if len(runs) == 1 else f"{run_label(run)}: {strategy}"
            ax.plot(part["num_removed"], part["loss"], marker="o", ms=3, ls="-" if i == 0 else "--",
                    color=COLORS[j % len(COLORS)], label=label)
    _style(ax, xlabel="blocks removed", ylabel="loss (nats)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_training(metrics: dict[str, pd.DataFrame]) -> Figure | None:
    """Training and validation loss against step, one color per run (``{label: metrics.csv}``)."""
    if not metrics:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for i, (label, frame) in enumerate(metrics.items()):
        color = COLORS[i % len(COLORS)]
        if "train_loss" in frame:
            ax.plot(frame["step"], frame["train_loss"], color=color, alpha=0.45, lw=1)
        if "val_loss" in frame and frame["val_loss"].notna().any():
            part = frame.dropna(subset=["val_loss"])
            ax.plot(part["step"], part["val_loss"], color=color, marker="o", ms=3, label=f"{label} (val)")
    _style(ax, xlabel="step", ylabel="loss (nats)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_grad_evolution(per_step: pd.DataFrame, label: str = "") -> Figure | None:
    """Per-layer gradient norm over training: x = layer, one line per diagnostic step."""
    if per_step is None or "grad_norm" not in per_step:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    steps = sorted(per_step["step"].unique())
    cmap = plt.get_cmap("viridis")
    for k, step in enumerate(steps):
        part = per_step[per_step["step"] == step]
        ax.plot(part["layer"], part["grad_norm"], color=cmap(k / max(1, len(steps) - 1)), lw=1.3,
                label=f"step {step}" if k in (0, len(steps) - 1) else None)
    ax.set_yscale("log")
    _style(ax, ylabel="grad norm")
    ax.set_title(label, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
