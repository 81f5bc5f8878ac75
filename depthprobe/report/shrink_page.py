"""The report page of a ``shrink`` folder: every removed unit justified by its measured
damage, its parameters and its held-out check, the curve against every block-only baseline,
what the export is, and (when measured) task retention and speed."""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from depthprobe.report.html import figure_html, page, table_html  # noqa: E402
from depthprobe.safeio import atomic_write_text  # noqa: E402


def plot_shrink_curve(curve: pd.DataFrame):
    """Held-out (else calibration) loss against the fraction of parameters kept, per strategy."""
    column = "heldout_loss" if curve["heldout_loss"].notna().any() else "loss"
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for strategy, rows in curve.groupby("strategy", sort=False):
        rows = rows.sort_values("step")
        style = {"linewidth": 2.5, "marker": "o"} if strategy == "shrink" else {"marker": ".", "alpha": 0.8}
        ax.plot(rows["params_fraction"], rows[column], label=strategy, **style)
    ax.invert_xaxis()
    ax.set_xlabel("fraction of parameters kept")
    ax.set_ylabel(column.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _p(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def render_shrink(folder: str | Path) -> str:
    out = Path(folder)
    s = json.loads((out / "shrink.json").read_text())
    curve = pd.read_csv(out / "shrink_curve.csv")
    steps = pd.read_csv(out / "shrink_steps.csv")
    parts = [f"<h1>{html.escape('depthprobe shrink')}</h1>",
             _p(f"Removed {s['num_removed']} units ({', '.join(s['removed'])}); stopped: {s['stopped']}. "
                f"Parameters {s['params_before']:,} -> {s['params_after']:,} ({s['params_fraction']:.4f} kept, only "
                f"weights that are gone counted); blocks {s['num_layers_before']} -> {s['num_layers_after']}."),
             _p(f"Calibration loss {s['loss_before']:.4f} -> {s['loss_after']:.4f}.")]
    if "heldout_loss_before" in s:
        lo, hi = s["heldout_loss_after_interval"]
        parts.append(_p(f"Held-out loss ({s['heldout_source']}) {s['heldout_loss_before']:.4f} -> "
                        f"{s['heldout_loss_after']:.4f} [95% interval {lo:.4f}, {hi:.4f}]."))
    best = s.get("block_only_best")
    if best:
        verdict = "at or below" if s.get("heldout_at_or_below_block_only") else "above"
        parts.append(_p(f"Best block-only strategy at the same or more parameters: {best['strategy']} with "
                        f"{best['step']} blocks removed ({best['params']:,} parameters), held-out loss "
                        f"{best['heldout_loss']:.4f}; the shrink is {verdict} it."))
    at = s.get("block_only_at_target")
    if at:
        verdict = "at or below" if s.get("heldout_at_or_below_block_only_at_target") else "above"
        parts.append(_p(f"Best block-only strategy that reaches the target: {at['strategy']} with {at['step']} "
                        f"blocks removed ({at['params']:,} parameters), held-out loss {at['heldout_loss']:.4f}; "
                        f"the shrink is {verdict} it."))
    export = s["export"]
    parts.append(_p(f"Export: {export['format']} ({export['model_type']}); loads with {export['loads_with']}; "
                    f"needs {export['needs']}."))
    if s.get("starts"):
        parts.append("<h2>Where the search started</h2>")
        parts.append(_p(f"Search: {s['search']}. Each start's search to the target, on the same calibration "
                        "windows (the lower calibration loss is kept; held-out only checks):"))
        parts.append(table_html(pd.DataFrame([{**st, "seed": ";".join(st["seed"]), "removed": ";".join(st["removed"])}
                                              for st in s["starts"]])))
    parts.append("<h2>Why each unit was removed</h2>")
    parts.append(_p("damage = calibration loss without the unit minus the loss before it, measured on the model as it "
                    "was at that step; the unit with the least damage per parameter went (at the step that "
                    "reaches the target, the least damage among the units that reach it; a start's seed blocks, "
                    "the block-only greedy's choices, the least damage among blocks); heldout_loss is the "
                    "model after the step on held-out windows."))
    parts.append(table_html(steps))
    parts.append(figure_html(plot_shrink_curve(curve), "Loss against parameters kept: the shrink and every "
                             "block-only baseline on the same windows (shrink_curve.csv).", "shrink curve"))
    for name, title in (("eval_retention.csv", "Task retention (95% paired bootstrap)"),
                        ("bench_speedup.csv", "Measured speed of the exported model")):
        if (out / name).is_file():
            parts += [f"<h2>{html.escape(title)}</h2>", table_html(pd.read_csv(out / name))]
    if s.get("speed"):
        sp = s["speed"]
        parts.append(_p(f"Target speedup {sp['target']} ({sp['speedup_on']}): measured {sp['speedup']:.3f}x on "
                        f"{sp['measured_on']}."))
    if s.get("calibration_check"):
        c = s["calibration_check"]
        parts.append(_p(f"Calibration check on {c['text_file']}: {c['shared']} units shared, Jaccard "
                        f"{c['jaccard']:.2f}; only here {', '.join(c['only_first']) or '-'}; only there "
                        f"{', '.join(c['only_second']) or '-'}."))
    parts.append("<h2>Curve</h2>" + table_html(curve))
    return page("depthprobe shrink", "".join(parts))


def write_shrink_report(folder: str | Path, path: str | Path) -> Path:
    atomic_write_text(Path(path), render_shrink(folder))
    return Path(path)
