"""One self-contained HTML file per report: inline CSS, figures as base64 PNG, a few lines
of inline JS for the sortable table. A Content-Security-Policy forbids every request, so
the file works offline and cannot leak anything. Every user-supplied string is escaped.

This module only renders: run folders are read by :func:`depthprobe.results.load_runs`,
the one place that knows their layout.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from depthprobe.errors import DepthprobeError
from depthprobe.report import figures as F
from depthprobe.report.align import aligned, kept_blocks, mark_removed, original_indices
from depthprobe.report.captions import activation_caption, drop_caption, lens_caption
from depthprobe.report.eval_figures import sections as eval_sections
from depthprobe.report.findings import findings
from depthprobe.report.lens_figures import lens_sections
from depthprobe.report.prune_summary import prune_sentences
from depthprobe.report.repair_figures import plot_repair_curve
from depthprobe.report.vision_figures import vision_sections
from depthprobe.results import AnalysisResult, load_runs
from depthprobe.safeio import atomic_write_text

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

CSS = """
body{font:14px/1.5 -apple-system,'Segoe UI',Helvetica,Arial,sans-serif;color:#222;max-width:1180px;margin:24px auto;
padding:0 20px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 6px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555;font-size:13px}.meta td{padding:1px 14px 1px 0;vertical-align:top}
.findings{background:#f4f7fb;border-left:4px solid #1f5fa8;padding:10px 16px;margin:16px 0}
.findings li{margin:3px 0}figure{margin:10px 0 22px}figure img{max-width:100%;height:auto;display:block}
figcaption{color:#555;font-size:13px;margin-top:4px}
table.data{border-collapse:collapse;font-size:12.5px;font-variant-numeric:tabular-nums}
table.data th,table.data td{border-bottom:1px solid #e5e5e5;padding:3px 8px;text-align:right}
table.data th{cursor:pointer;background:#fafafa;position:sticky;top:0}table.data th:hover{background:#eef}
.scroll{max-height:520px;overflow:auto;border:1px solid #e5e5e5}code{background:#f3f3f3;padding:0 3px}
details{margin:10px 0}pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:12px}
"""

# Sorting by clicking a header; numbers compare as numbers. Also records rendered figure
# sizes and JS errors as data attributes (read back by the browser tests).
JS = """
document.querySelectorAll('table.data').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th,i){th.addEventListener('click',function(){
    var body=t.tBodies[0],rows=Array.from(body.rows),asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
    rows.sort(function(a,b){var x=a.cells[i].textContent,y=b.cells[i].textContent,
      nx=parseFloat(x),ny=parseFloat(y);var c=(isNaN(nx)||isNaN(ny))?x.localeCompare(y):nx-ny;return asc?c:-c;});
    rows.forEach(function(r){body.appendChild(r);});});});});
window.addEventListener('load',function(){document.querySelectorAll('figure img').forEach(function(img){
  var r=img.getBoundingClientRect();img.dataset.renderedWidth=Math.round(r.width);
  img.dataset.renderedHeight=Math.round(r.height);img.dataset.natural=img.naturalWidth+'x'+img.naturalHeight;});
  document.body.dataset.scripts=document.scripts.length;document.body.dataset.ready='1';});
window.addEventListener('error',function(e){document.body.dataset.jsError=String(e.message);});
"""


def figure_html(fig, caption: str, alt: str) -> str:
    if fig is None:
        return ""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def table_html(frame: pd.DataFrame, digits: int = 5) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "" if pd.isna(v) else f"{v:.{digits}g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f'<div class="scroll"><table class="data"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'


def _header(runs: Sequence[AnalysisResult]) -> str:
    keys = [("model", "model"), ("architecture", "architecture"), ("family", "family"),
            ("norm_placement", "norm placement"), ("num_layers", "blocks"), ("num_tokens", "tokens"),
            ("text_source", "text"), ("dtype", "dtype"), ("device", "device"), ("base_loss", "loss"),
            ("base_perplexity", "perplexity")]
    rows = []
    for key, label in keys:
        values = []
        for run in runs:
            v = run.summary.get(key)
            values.append("—" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
        rows.append(f"<tr><td>{label}</td>" + "".join(f"<td>{html.escape(v)}</td>" for v in values) + "</tr>")
    times = [sum((r.summary.get("timings_s") or {}).values()) for r in runs]
    rows.append("<tr><td>run time</td>" + "".join(f"<td>{t:.1f} s</td>" for t in times) + "</tr>")
    versions = runs[0].summary.get("versions") or {}
    rows.append("<tr><td>versions</td><td colspan=9>"
                + html.escape(", ".join(f"{k} {v}" for k, v in versions.items())) + "</td></tr>")
    label_row = ""
    if len(runs) > 1:
        label_row = "<tr><td></td>" + "".join(
            f'<td><b style="color:{F.COLORS[i % len(F.COLORS)]}">{html.escape(F.run_label(r))}</b></td>'
            for i, r in enumerate(runs)) + "</tr>"
    return f'<table class="meta">{label_row}{"".join(rows)}</table>'


def _figure_sections(runs: Sequence[AnalysisResult]) -> list[tuple[str, object, str]]:
    """(heading, figure or None, caption) for every figure the report can show."""
    sections = [
        ("How much each block changes the stream", F.plot_layers(runs, ["angular_distance", "block_influence"]),
         "Higher means the block rotates the residual stream more; a block near 0 passes its input on almost "
         "unchanged (angular distance = mean arccos(cos(x_l, x_l+1))/π; block influence = 1 − mean cos)."),
        ("Activation scale", F.plot_layers(runs, ["activation_variance", "max_abs_activation"]),
         activation_caption(runs)),
        ("Gradient norms", F.plot_grad_norms(runs),
         "Log scale: L2 norm of each block's parameter gradients for the mean-token LM loss; solid is the whole "
         "block, dashed the attention sublayer, dotted the MLP. Small values deep in a Pre-LN model mean those "
         "layers barely learn."),
        ("Logit lens", F.plot_lens(runs), lens_caption(runs)),
        ("Angular distance between layers l and l+n", F.plot_angular_heatmap(runs),
         "Each cell is d(x_l, x_l+n); dark cells are runs of n blocks that change the stream little and are "
         "candidates for removal together (Gromov et al. 2024)."),
        ("What dropping each block costs", F.plot_drop(runs), drop_caption(runs)),
        ("Dropping runs of blocks", F.plot_block_drop(runs),
         "Each dot removes blocks l..l+n−1; if angular distance predicts damage, dots rise from left to right."),
        ("Pruning curves", F.plot_prune_curve(runs),
         "Loss after removing K blocks as chosen by each strategy; the lowest curve is the best proxy here, "
         "greedy re-measures after every removal."),
        ("Repair and healing", plot_repair_curve(runs),
         "Held-out loss: blocks removed (dashed), with a linear map fused at each seam (solid), healed with "
         "LoRA (star); grey: the full model."),
        ("Weight spectra (no data)", F.plot_layers(runs, ["spectra_alpha", "spectra_stable_rank"]),
         "Per block, the mean over its weight matrices of the power-law exponent α of the eigenvalues of WᵀW "
         "(WeightWatcher's fit: smaller α, heavier tail) and of the stable rank Σλ/λ_max; per matrix in "
         "spectra.csv."),
    ]
    training = {F.run_label(r): r.tables["metrics"] for r in runs if "metrics" in r.tables}
    if training:
        sections.append(("Training", F.plot_training(training),
                         "Training loss (faint) and validation loss (dots) against step, one color per run."))
    for run in runs:
        if "train_layers" in run.tables:
            sections.append((f"Per-layer gradient norm during training — {F.run_label(run)}",
                             F.plot_grad_evolution(run.tables["train_layers"], F.run_label(run)),
                             "One line per diagnostic step, from early (dark) to late (yellow)."))
    return sections


def _sentence_boxes(runs: Sequence[AnalysisResult], title: str, sentences_of) -> str:
    """One box of plain-language sentences per run that has any (the run named when several)."""
    parts = []
    for run in runs:
        sentences = sentences_of(run)
        if sentences:
            who = f" — {html.escape(F.run_label(run))}" if len(runs) > 1 else ""
            parts.append(f'<div class="findings"><b>{title}{who}</b><ul>'
                         + "".join(f"<li>{html.escape(s)}</li>" for s in sentences) + "</ul></div>")
    return "".join(parts)


def _findings_as_shown(run: AnalysisResult) -> list[str]:
    """Findings of a run shown beside others: a pruned run's in original block indices, the
    pruned index in brackets."""
    kept = kept_blocks(run)
    sentences = findings(run)
    return sentences if kept is None else [original_indices(s, kept) for s in sentences]


def render(runs: Sequence[AnalysisResult], title: str | None = None) -> str:
    """The report as one HTML string."""
    if not runs:
        raise DepthprobeError("nothing to report: give at least one run")
    title = title or ("depthprobe: " + " vs ".join(F.run_label(r) for r in runs))
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="meta">Generated {time.strftime("%Y-%m-%d %H:%M")} by depthprobe. '
             "Layer indices are 0-based; x<sub>l</sub> is the input of block l.</p>", _header(runs),
             _sentence_boxes(runs, "Pruned model", prune_sentences)]
    for run in runs:  # a comparison's main result: shown once, first
        if "comparison" in run.tables:
            parts.append("<h2>Comparison across seeds</h2><p class='meta'>Final validation loss per variant: mean "
                         "and sd over seeds, and a paired t-test / Wilcoxon test against pre.</p>"
                         + table_html(run.tables["comparison"]))
    # side by side, pruned runs are drawn on their original's block indices (report.align)
    shown = [aligned(r) for r in runs] if len(runs) > 1 else list(runs)
    parts.append(_sentence_boxes(runs, "Findings", _findings_as_shown if len(runs) > 1 else findings))
    for heading, fig, caption in _figure_sections(shown):
        mark_removed(fig, shown, F.COLORS)
        if fig is not None:
            parts.append(f"<h2>{html.escape(heading)}</h2>" + figure_html(fig, caption, heading))
    parts += eval_sections(runs, figure_html, table_html)
    parts += vision_sections(runs, figure_html, table_html)
    parts += lens_sections(runs, figure_html, table_html)
    for name, heading in (("proxies", "Which proxy predicts the real damage"),
                          ("prune_excess", "Pruning by proxy: loss above the greedy (least harmful) choice"),
                          ("spectra", "Weight spectra per matrix (WeightWatcher 0.7.7's conventions)")):
        for run in runs:
            if name in run.tables:
                parts.append(f"<h2>{html.escape(heading)} — {html.escape(F.run_label(run))}</h2>"
                             + table_html(run.tables[name]))
    frames = []
    for run in shown:
        frame = run.layers.copy()
        if len(runs) > 1:
            frame.insert(0, "run", F.run_label(run))
        frames.append(frame)
    parts.append("<h2>Per-layer table</h2><p class='meta'>Click a column header to sort.</p>"
                 + table_html(pd.concat(frames, ignore_index=True)))
    for run in runs:
        config = {k: run.summary.get(k) for k in ("config", "timings_s", "notes", "prune")}
        parts.append(f"<details><summary>Settings of {html.escape(F.run_label(run))}</summary><pre>"
                     + html.escape(json.dumps(config, indent=2, default=str)) + "</pre></details>")
    return page(title, "".join(parts), JS)


def page(title: str, body: str, script: str = "") -> str:
    """One self-contained HTML page (inline CSS, no external request): ``body`` is HTML built
    from escaped text, :func:`table_html` and :func:`figure_html`; ``title`` is escaped here."""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>{body}"
            + (f"<script>{script}</script>" if script else "") + "</body></html>")


def write_report(runs: Sequence[AnalysisResult | str | Path], path: str | Path, title: str | None = None) -> Path:
    """Render ``runs`` (results or run folders) side by side into one HTML file at ``path``.

    Example:
        >>> write_report(["runs/smol", "runs/smol-24"], "compare.html")   # doctest: +SKIP
    """
    loaded = [run for r in runs for run in ([r] if isinstance(r, AnalysisResult) else load_runs(r))]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, render(loaded, title))
    return out
