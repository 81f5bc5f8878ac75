"""Reports: matplotlib figures (also for notebooks), computed findings, one self-contained HTML file.

    figures.py   plot_layers, plot_grad_norms, plot_lens, plot_angular_heatmap, plot_drop, ...
    findings.py  findings(result) -> plain-language sentences backed by the numbers
    html.py      render / write_report (run folders are read by depthprobe.results.load_runs)
    notebook.py  result_html: what a notebook shows for a result
"""

from depthprobe.report.figures import (
    plot_angular_heatmap,
    plot_block_drop,
    plot_drop,
    plot_grad_evolution,
    plot_grad_norms,
    plot_layers,
    plot_lens,
    plot_prune_curve,
    plot_training,
)
from depthprobe.report.findings import findings
from depthprobe.report.html import render, write_report
from depthprobe.results import load_run, load_runs

__all__ = [
    "findings",
    "load_run",
    "load_runs",
    "plot_angular_heatmap",
    "plot_block_drop",
    "plot_drop",
    "plot_grad_evolution",
    "plot_grad_norms",
    "plot_layers",
    "plot_lens",
    "plot_prune_curve",
    "plot_training",
    "render",
    "write_report",
]
