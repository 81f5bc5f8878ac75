"""Report figure for ``prune --repair / --heal``: held-out loss, plain removal vs repaired vs healed."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from depthprobe.report.figures import COLORS, _style, run_label
from depthprobe.results import AnalysisResult


def plot_repair_curve(runs: Sequence[AnalysisResult]) -> Figure | None:
    """Held-out loss against blocks removed: plain removal (dashed), repaired (solid), the
    healed model (star, at the chosen K) and the full model (grey line), one color per run."""
    runs = [r for r in runs if "repair_curve" in r.tables]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for i, run in enumerate(runs):
        color, name = COLORS[i % len(COLORS)], run_label(run)
        curve = run.tables["repair_curve"].sort_values("num_removed")
        ax.plot(curve["num_removed"], curve["heldout_loss_plain"], ls="--", marker="o", ms=3, color=color,
                label=f"{name}: blocks removed")
        ax.plot(curve["num_removed"], curve["heldout_loss_repaired"], ls="-", marker="o", ms=3, color=color,
                label=f"{name}: repaired")
        info = run.summary.get("prune", {})
        healed = info.get("heldout_loss_healed")
        if healed is not None and healed == healed:
            ax.plot([info["num_removed"]], [healed], marker="*", ms=11, ls="", color=color, label=f"{name}: healed")
        if info.get("heldout_loss_full") is not None:
            ax.axhline(info["heldout_loss_full"], color="#888888", lw=1, alpha=0.7)
    _style(ax, xlabel="blocks removed", ylabel="held-out loss (nats)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
