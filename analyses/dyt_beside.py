"""Claim 5, DyT (Zhu et al. 2025, "Transformers without Normalization"): replacing every norm
by Dynamic Tanh, gamma * tanh(alpha * x) + beta (alpha a learnable scalar), matches the
normalized model (LLaMA 7B-70B: training loss equal to RMSNorm's within 0.01-0.02). Here DyT
sits in Pre-LN's positions (and the final norm) with the paper's LLM recipe: the
attention-input DyT has its own alpha0 (1.0 here; the others 0.5) and a learnable scalar,
init sqrt(d), multiplies the embeddings. It is put beside every placement on every measure of
claims 1-4; analyses/dyt_alpha0_probe.py varies the recipe.

DyT "matches" Pre-LN if the 95% interval of the paired final-loss difference lies within
±2% of Pre-LN's loss (an equivalence margin chosen here, about the spread between the
papers' placements). Reads the campaign's tables; writes reports/dyt_beside/.

    .venv/bin/python analyses/dyt_beside.py [--campaign reports/campaign] [--out reports/dyt_beside]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analyses import _common as C  # noqa: E402

NAME = "dyt_beside"
MARGIN = 0.02
MEASURES = ["final_val_loss", "rel_change", "ang_ratio", "drop_ratio", "log_var_slope", "log_maxabs_slope",
            "train_grad_cv", "train_log_grad_slope", "spikes", "zero_grad_steps", "zero_grad_from_step"]  # fmt: skip


def stall_text(m) -> str:
    """Whether DyT's training stalled: every block's gradient exactly 0 at diagnostic steps,
    and how large the residual stream had grown by the last block (final models)."""
    dyt = m[m.variant == "dyt"]
    stalled = dyt[dyt.zero_grad_steps > 0]
    if stalled.empty:
        return ""
    return (f"- DyT stalled in {len(stalled)}/{len(dyt)} seeds: every block's gradient exactly 0 from diagnostic step "
            f"{int(stalled.zero_grad_from_step.min())}-{int(stalled.zero_grad_from_step.max())} on; last block's output "
            f"variance / first's in the final models {dyt.var_last_first.min():.3g}-{dyt.var_last_first.max():.3g} "
            "(Pre-LN: " + f"{m[m.variant == 'pre'].var_last_first.min():.3g}-{m[m.variant == 'pre'].var_last_first.max():.3g}"
            "): the final DyT's tanh saturates, so no gradient reaches the blocks\n")


def main(argv: list[str] | None = None) -> None:
    args = C.claim_args(NAME, argv)
    out = Path(args.out)
    tables = C.load_campaign(Path(args.campaign))
    m = C.measures(tables)
    beside = m[["variant", *MEASURES]].groupby("variant").agg(["mean", "std"])
    beside.columns = ["_".join(c) for c in beside.columns]
    beside = beside.loc[[v for v in C.VARIANTS if v in beside.index]].reset_index()
    vs_pre = C.paired_table(m, "final_val_loss", "pre")
    vs_pre = vs_pre.set_index("variant").loc[[v for v in C.VARIANTS if v != "pre" and v in set(vs_pre.variant)]]
    vs_pre = vs_pre.reset_index()
    dyt = vs_pre[vs_pre.variant == "dyt"].iloc[0]
    pre_loss = float(m[m.variant == "pre"].final_val_loss.mean())
    bound = MARGIN * pre_loss
    if -bound <= dyt.ci_low and dyt.ci_high <= bound:
        word, why = "reproduced", "the interval lies within the margin"
    elif dyt.ci_low > bound or dyt.ci_high < -bound:
        word, why = "not reproduced", "the interval lies outside the margin"
    else:
        word, why = "partly reproduced", "the interval crosses the margin (inconclusive)"
    rank = list(beside.sort_values("final_val_loss_mean").variant).index("dyt") + 1
    verdict = (f"# Claim 5: DyT matches normalization — {word}\n\n- DyT - Pre-LN final validation loss "
               f"{C.fmt_ci(dyt)} (95% t interval, n={dyt.n}), Holm p over five={dyt.p_holm:.3g}, d_z={dyt.cohen_dz:.3g}; "
               f"margin ±{bound:.4g} (2% of Pre-LN's {pre_loss:.4g}): {why}\n"
               f"- DyT ranks {rank} of {len(beside)} placements by mean final validation loss\n"
               f"{stall_text(m)}")  # fmt: skip
    layers = tables["layers"][tables["layers"].group == "main"]
    fig = C.plot_profiles(layers, ["angular_distance", "activation_variance", "grad_norm", "drop_delta_loss"],
                          list(C.VARIANTS), log=("activation_variance", "grad_norm"))  # fmt: skip
    C.write_page(out, "Claim 5: DyT beside the normalized placements", [
        ("Verdict", f'<div class="findings">{C.text_tag(verdict)}</div>'),
        ("Every placement on every measure (mean, sd over seeds)", C.table_tag(beside)),
        ("Final validation loss against Pre-LN (paired by seed, Holm over five)", C.table_tag(vs_pre)),
        ("Per-layer profiles of the final models (mean over seeds, band = min..max)", C.figure_tag(fig, "profiles")),
        ("How", C.text_tag(__doc__)),
    ])  # fmt: skip
    stalled = m[m.variant == "dyt"][["seed", "zero_grad_steps", "zero_grad_from_step", "var_last_first"]]
    stalled = stalled.assign(stalled=stalled.zero_grad_steps > 0).sort_values("seed")
    C.finish(out, NAME, argv, verdict, {"beside": beside, "vs_pre": vs_pre, "stalled": stalled})


if __name__ == "__main__":
    main()
