"""What a Jupyter notebook shows for an ``AnalysisResult``: a header, the findings, the main
figures and the per-layer table, as one self-contained HTML fragment (figures as inline PNG,
no script, no external request)."""

from __future__ import annotations

import html

from depthprobe.report import figures as F
from depthprobe.report.findings import findings
from depthprobe.report.html import figure_html, table_html
from depthprobe.results import AnalysisResult


def result_html(result: AnalysisResult) -> str:
    """The notebook view of one result (``AnalysisResult._repr_html_``)."""
    s = result.summary
    head = (f"<b>{html.escape(str(s.get('model')))}</b>: {result.num_layers} blocks, {s.get('num_tokens')} tokens, "
            f"{html.escape(str(s.get('dtype')))} on {html.escape(str(s.get('device')))}")
    if s.get("base_loss") is not None:
        head += f"; loss {s['base_loss']:.4f}, perplexity {s['base_perplexity']:.2f}"
    sentences = "".join(f"<li>{html.escape(x)}</li>" for x in findings(result))
    figures = [
        (F.plot_layers(result, ["angular_distance", "block_influence"]), "How much each block changes the stream"),
        (F.plot_layers(result, ["activation_variance", "max_abs_activation"]), "Activation scale (log)"),
        (F.plot_grad_norms(result), "Gradient norms (log)"),
        (F.plot_lens(result), "Logit lens"),
        (F.plot_drop(result), "What dropping each block costs"),
    ]
    images = "".join(figure_html(fig, caption, caption) for fig, caption in figures if fig is not None)
    return (f'<div class="depthprobe-result"><p>{head}</p>'
            + (f"<ul>{sentences}</ul>" if sentences else "")
            + images + table_html(result.layers) + "</div>")
