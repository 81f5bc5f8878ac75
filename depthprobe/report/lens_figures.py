"""The report's lens sections: logit vs tuned lens KL per block (with what trained the lens)
and the per-position heatmap of ``lens_tokens.csv`` (positions x blocks, the top-1 token's
text, shaded by its probability). Token strings are escaped."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence

import matplotlib.pyplot as plt
import pandas as pd

from depthprobe.report import figures as F
from depthprobe.results import AnalysisResult


def _token_text(token: object) -> str:
    """Whitespace made visible (a leading space as a dot, newlines and tabs as symbols), escaped."""
    text = str(token) if token is not None and not (isinstance(token, float) and pd.isna(token)) else ""
    return html.escape(text.replace("\n", "\u23ce").replace("\t", "\u21e5").replace(" ", "\u00b7"))


def heatmap_html(table: pd.DataFrame, window: int = 0) -> str:
    """One window's top-1 tokens as an HTML table: a row per position, a column per block."""
    top = table[(table["window"] == window) & (table["rank"] == 1)]
    layers = sorted(top["layer"].unique())
    head = "".join(f"<th>{int(layer)}</th>" for layer in layers)
    rows = []
    for position, part in top.groupby("position"):
        cells = part.set_index("layer")
        tds = []
        for layer in layers:
            if layer not in cells.index:
                tds.append("<td></td>")
                continue
            prob = float(cells.loc[layer, "prob"])
            ink = "#fff" if prob > 0.55 else "#111"
            tds.append(f'<td style="background:rgba(31,95,168,{prob:.3f});color:{ink}" '
                       f'title="p={prob:.3f}">{_token_text(cells.loc[layer, "token"])}</td>')
        rows.append(f"<tr><th>{int(position)}</th>{''.join(tds)}</tr>")
    return ('<div class="scroll"><table class="data lens-heatmap"><thead><tr><th>position \\ block</th>'
            f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")


def _kl_figure(runs: Sequence[AnalysisResult]):
    shown = [r for r in runs if "tuned_lens_kl" in r.layers]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    for run in shown:
        label = F.run_label(run)
        ax.plot(run.layers["layer"], run.layers["logit_lens_kl"], marker="o", ms=3, label=f"{label}: logit lens")
        ax.plot(run.layers["layer"], run.layers["tuned_lens_kl"], marker="s", ms=3, label=f"{label}: tuned lens")
    ax.set_xlabel("block l (its output x_{l+1})")
    ax.set_ylabel("KL(final || lens), nats")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def lens_sections(runs: Sequence[AnalysisResult], figure_html: Callable, table_html: Callable) -> list[str]:
    """HTML sections for runs with tuned-lens columns or a ``lens_tokens`` table."""
    parts = []
    fig = _kl_figure(runs)
    if fig is not None:
        trained = "; ".join(f"{html.escape(F.run_label(r))}: {html.escape(str(r.summary['tuned_lens']['trained_on']))}"
                            for r in runs if isinstance(r.summary.get("tuned_lens"), dict))
        caption = ("KL of each block's readout to the model's final distribution (mean over positions). The tuned "
                   "lens maps x_{l+1} to x + A x + b before the final norm and head. Lens trained on: " + trained)
        parts.append("<h2>Logit lens vs tuned lens</h2>" + figure_html(fig, caption, "logit vs tuned lens KL"))
    for run in runs:
        table = run.tables.get("lens_tokens")
        if table is None or table.empty:
            continue
        parts.append(f"<h2>Logit lens per position — {html.escape(F.run_label(run))}</h2>"
                     "<p class='meta'>Window 0: the most likely next token read from each block's output, shaded by "
                     "its probability (hover for p). All windows and the top-k are in lens_tokens.csv.</p>"
                     + heatmap_html(table))
    return parts
