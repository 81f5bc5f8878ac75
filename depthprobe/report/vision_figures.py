"""Report sections for image models: probes by depth, response-map localization, lesion error."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence

from depthprobe.report import figures as F
from depthprobe.results import AnalysisResult

__all__ = ["vision_sections"]

_SECTIONS = (
    ("Linear probes by depth", ("probe_accuracy", "probe_auc", "sparse_probe_units"),
     "A linear probe on each block's features averaged over positions, scored on a held-out 30%: accuracy "
     "(classes) or mean ROC AUC (attributes); units: how many an L1 probe needs for 95% of the dense probe's "
     "AUC, mean over targets (Alain & Bengio 2016; Liu et al. 2015)."),
    ("Response maps against the ground-truth boxes", ("pointing_accuracy", "response_iou"),
     "Grad-CAM of each block for the attributes together (or the true class): share of images whose map peaks "
     "inside the box, and IoU of the map above half its maximum with the box; baselines in the table below."),
    ("Error when each block is deleted", ("drop_delta_error",),
     "Increase of the error rate when block l is replaced by its shortcut (identity, or its projection in a "
     "downsampling block): Veit et al.'s lesion."),
)


def vision_sections(runs: Sequence[AnalysisResult], figure_html: Callable, table_html: Callable) -> list[str]:
    """HTML sections for the vision columns present in ``runs`` (none for text models)."""
    parts = []
    for heading, columns, caption in _SECTIONS:
        present = [c for c in columns if any(c in r.layers and r.layers[c].notna().any() for r in runs)]
        if present:
            fig = F.plot_layers(runs, present)
            parts.append(f"<h2>{html.escape(heading)}</h2>" + figure_html(fig, caption, heading))
    for run in runs:
        if "response_baselines" in run.tables:
            label = html.escape(F.run_label(run))  # user-supplied model names
            parts.append(f"<h2>Localization baselines — {label}</h2>" + table_html(run.tables["response_baselines"]))
    return parts
