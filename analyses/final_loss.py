"""Claim 4, LayerNorm Scaling vs Pre-LN, Mix-LN and Post-LN on final validation loss at equal
tokens (Sun et al. 2025, Table 1; same ordering in Li et al. 2024): at 130M parameters on C4,
perplexity Post 26.95, Pre 26.73, Mix 26.07, LNS 25.76 (LNS 3.6% below Pre, Mix 2.5% below,
Post 0.8% above). Here: the same comparison (plus Peri-LN and DyT) with the campaign's models,
paired by seed (same init, same data order), Holm over the five comparisons with Pre-LN.

Also checks the campaign's training length: the validation loss must change by < 2% over
the last 20% of the steps of every run. Reads the campaign's tables; writes reports/final_loss/.

    .venv/bin/python analyses/final_loss.py [--campaign reports/campaign] [--out reports/final_loss]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analyses import _common as C  # noqa: E402

NAME = "final_loss"
PAPER_PPL = {"post": 26.95, "pre": 26.73, "mix": 26.07, "lns": 25.76}


def parts(m) -> list:
    loss = lambda v: C.by_seed(m, v, "final_val_loss")  # noqa: E731
    return [
        ("LNS below Pre-LN", "val loss: lns - pre", -1, loss("lns"), loss("pre")),
        ("Mix-LN below Pre-LN", "val loss: mix - pre", -1, loss("mix"), loss("pre")),
        ("Post-LN above Pre-LN", "val loss: post - pre", +1, loss("post"), loss("pre")),
        ("LNS below Mix-LN", "val loss: lns - mix", -1, loss("lns"), loss("mix")),
    ]


def summary_table(m: pd.DataFrame) -> pd.DataFrame:
    """Per variant: mean/sd of loss and perplexity, paired difference with Pre-LN (interval,
    Holm p, d_z), perplexity ratio to Pre-LN here and in the paper."""
    agg = m.groupby("variant").agg(seeds=("seed", "count"), diverged=("diverged", "sum"),
                                   val_loss_mean=("final_val_loss", "mean"), val_loss_sd=("final_val_loss", "std"),
                                   val_ppl_mean=("final_val_ppl", "mean"), val_ppl_sd=("final_val_ppl", "std"))  # fmt: skip
    paired = C.paired_table(m, "final_val_loss", "pre").set_index("variant")
    agg = agg.join(paired[["mean_diff", "ci_low", "ci_high", "p", "p_holm", "cohen_dz"]])
    # ppl ratio = exp(mean loss difference): per-seed pairs share data, so this is the paired ratio
    agg["ppl_ratio_vs_pre"] = np.exp(agg.mean_diff.fillna(0.0))
    agg["paper_ppl"] = [PAPER_PPL.get(v, math.nan) for v in agg.index]
    agg["paper_ppl_ratio_vs_pre"] = agg.paper_ppl / PAPER_PPL["pre"]
    order = [v for v in C.VARIANTS if v in agg.index]
    return agg.loc[order].reset_index()


def main(argv: list[str] | None = None) -> None:
    args = C.claim_args(NAME, argv)
    out = Path(args.out)
    tables = C.load_campaign(Path(args.campaign))
    m = C.measures(tables)
    table = C.test_parts(parts(m))
    summary = summary_table(m)
    conv = m[["variant", "seed", "val_start", "val_end", "rel_change"]].sort_values(["variant", "seed"])
    conv["converged"] = conv.rel_change < 0.02
    ranking = " < ".join(summary.sort_values("val_loss_mean").variant)
    verdict = (f"# Claim 4: final validation loss, LNS vs Pre/Mix/Post — {C.overall_verdict(table)}\n\n"
               f"{C.parts_text(table)}\n- Ranking by mean final validation loss here (best first): {ranking}; "
               f"paper (perplexity): lns < mix < pre < post\n- Plateau check: {int(conv.converged.sum())}/{len(conv)} "
               f"runs changed < 2% over the last 20% of steps (largest change {conv.rel_change.max():.2%})\n")  # fmt: skip
    C.write_page(out, "Claim 4: final validation loss at equal tokens", [
        ("Verdict", f'<div class="findings">{C.text_tag(verdict)}</div>'),
        ("Per variant (paired differences against Pre-LN, Holm over the five)", C.table_tag(summary)),
        ("Tests of the paper's ordering (paired by seed, Holm over the parts)", C.table_tag(table)),
        ("Training length check: validation loss change over the last 20% of steps", C.table_tag(conv)),
        ("How", C.text_tag(__doc__)),
    ])  # fmt: skip
    C.finish(out, NAME, argv, verdict, {"tests": table, "per_variant": summary, "convergence": conv})


if __name__ == "__main__":
    main()
