"""Claim 2, Mix-LN (Li et al. 2024, "Mix-LN: Unleashing the Power of Deeper Layers by
Combining Pre-LN and Post-LN"): Pre-LN's gradient norms shrink with depth, Post-LN's shrink
toward the input; Mix-LN (Post-LN in the first 25% of blocks, Pre-LN after) has the most
uniform per-block gradient norms, and its deep blocks cost more to drop than Pre-LN's.

Measured over training: at every diagnostic step after the first, the per-block gradient
norms of the step's gradient (before clipping); their slope of ln(norm) per block (< 0:
shrink with depth) and their coefficient of variation across blocks, averaged over steps.
Reads the campaign's tables; writes reports/mixln_gradients/.

    .venv/bin/python analyses/mixln_gradients.py [--campaign reports/campaign] [--out reports/mixln_gradients]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib.pyplot as plt  # noqa: E402

from analyses import _common as C  # noqa: E402  (sets the Agg backend before pyplot)

NAME = "mixln_gradients"


def parts(m) -> list:
    zeros = np.zeros(len(C.by_seed(m, "pre", "train_log_grad_slope")))
    cv = lambda v: C.by_seed(m, v, "train_grad_cv")  # noqa: E731
    return [
        ("Pre-LN gradients shrink with depth", "slope ln grad / block", -1,
         C.by_seed(m, "pre", "train_log_grad_slope"), zeros),
        ("Post-LN gradients shrink toward the input", "slope ln grad / block", +1,
         C.by_seed(m, "post", "train_log_grad_slope"), zeros),
        ("Mix-LN more uniform than Pre-LN", "grad CV: mix - pre", -1, cv("mix"), cv("pre")),
        ("Mix-LN more uniform than Post-LN", "grad CV: mix - post", -1, cv("mix"), cv("post")),
        ("Mix-LN deep blocks cost more to drop than Pre-LN's", "drop deep: mix - pre", +1,
         C.by_seed(m, "mix", "drop_deep"), C.by_seed(m, "pre", "drop_deep")),
    ]  # fmt: skip


def grad_figure(train_layers, variants):
    """Per-block gradient norm over training, one panel per variant (seed 0), early dark -> late yellow."""
    fig, axes = plt.subplots(1, len(variants), figsize=(3.2 * len(variants), 3), sharey=True, squeeze=False)
    for ax, variant in zip(axes[0], variants, strict=True):
        sel = train_layers[(train_layers.variant == variant) & (train_layers.seed == train_layers.seed.min())]
        steps = sorted(sel.step.unique())
        for i, step in enumerate(steps):
            g = sel[sel.step == step].sort_values("layer")
            ax.plot(g.layer, g.grad_norm, color=plt.cm.viridis(i / max(1, len(steps) - 1)), lw=1)
        ax.set_yscale("log")
        ax.set_title(variant, fontsize=10)
        ax.set_xlabel("layer")
    axes[0][0].set_ylabel("block grad norm")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    args = C.claim_args(NAME, argv)
    out = Path(args.out)
    tables = C.load_campaign(Path(args.campaign))
    m = C.measures(tables)
    table = C.test_parts(parts(m))
    per_run = m[["variant", "seed", "train_log_grad_slope", "train_grad_cv", "final_log_grad_slope", "final_grad_cv",
                 "drop_deep", "drop_shallow"]].sort_values(["variant", "seed"])  # fmt: skip
    per_variant = per_run.drop(columns="seed").groupby("variant").agg(["mean", "std"]).round(5)
    per_variant.columns = ["_".join(c) for c in per_variant.columns]
    per_variant = per_variant.reset_index().sort_values("train_grad_cv_mean")
    stalled = set(m[m.zero_grad_steps > 0].variant)  # all-zero gradients for most of training: CV not comparable
    most_uniform = per_variant[~per_variant.variant.isin(stalled)].variant.iloc[0]
    verdict = (f"# Claim 2: Mix-LN gradient uniformity — {C.overall_verdict(table)}\n\n{C.parts_text(table)}\n"
               f"- Most uniform gradients over training here (lowest mean CV across blocks"
               f"{', leaving out the stalled ' + ', '.join(sorted(stalled)) if stalled else ''}): {most_uniform}\n")
    train_layers = tables["train_layers"][tables["train_layers"].group == "main"]
    C.write_page(out, "Claim 2: Mix-LN — gradient norms across depth", [
        ("Verdict", f'<div class="findings">{C.text_tag(verdict)}</div>'),
        ("Tests (paired by seed, Holm over the parts)", C.table_tag(table)),
        ("Per variant (mean, sd over seeds), most uniform first", C.table_tag(per_variant)),
        ("Per-block gradient norm during training (first seed; dark = early, yellow = late)",
         C.figure_tag(grad_figure(train_layers, list(C.VARIANTS)), "gradient evolution")),
        ("Per run", C.table_tag(per_run)),
        ("How", C.text_tag(__doc__)),
    ])  # fmt: skip
    C.finish(out, NAME, argv, verdict, {"tests": table, "per_run": per_run, "per_variant": per_variant})


if __name__ == "__main__":
    main()
