"""Claim 3, Peri-LN (Kim et al. 2025, "Peri-LN: Revisiting Normalization Layer in the
Transformer Architecture"): with a norm on each sublayer's input and output, activation
variance and max |activation| stay bounded with depth where Pre-LN's grow; and Peri-LN has
fewer loss spikes and no divergence at learning rates where Pre-LN spikes or diverges.

Depth growth: slope of ln(activation variance) and of ln(max |activation|) per block in the
final models (paired by seed, Holm). Learning-rate sweep (seed 0, shorter runs, pre and
peri, with the usual gradient clip at 1.0 and, at the high rates, without clipping): a spike is a step after warmup whose training loss exceeds 1.2 x the median of the
previous 20 steps; a run fails if it diverged (NaN/inf) or its final validation loss is above
its first one. Reads the campaign's tables; writes reports/periln_stability/.

    .venv/bin/python analyses/periln_stability.py [--campaign reports/campaign] [--out reports/periln_stability]
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analyses import _common as C  # noqa: E402

NAME = "periln_stability"
SWEEP = ("pre", "peri")


def parts(m) -> list:
    return [
        ("Peri-LN variance grows less with depth", "slope ln var: peri - pre", -1,
         C.by_seed(m, "peri", "log_var_slope"), C.by_seed(m, "pre", "log_var_slope")),
        ("Peri-LN max |activation| grows less with depth", "slope ln max|a|: peri - pre", -1,
         C.by_seed(m, "peri", "log_maxabs_slope"), C.by_seed(m, "pre", "log_maxabs_slope")),
    ]  # fmt: skip


def sweep_table(tables: dict) -> pd.DataFrame:
    """Spikes and failure per (variant, lr): the sweep runs plus seed 0 of the main grid."""
    sweep = C.measures(tables, group="sweep")
    main = C.measures(tables, group="main")
    main = main[main.variant.isin(SWEEP) & (main.seed == main.seed.min())]
    both = pd.concat([main.assign(steps="main"), sweep.assign(steps="sweep")], ignore_index=True)
    metrics = tables["metrics"]
    first_val = []
    for row in both.itertuples(index=False):
        group = "main" if row.steps == "main" else "sweep"
        sel = metrics[(metrics.group == group) & (metrics.variant == row.variant) & (metrics.seed == row.seed)
                      & (metrics.lr == row.lr) & (metrics.grad_clip == row.grad_clip)].dropna(subset=["val_loss"])  # fmt: skip
        first_val.append(sel.val_loss.iloc[0] if len(sel) else float("nan"))
    both["first_val_loss"] = first_val
    both["failed"] = both.diverged | ~(both.final_val_loss < both.first_val_loss)
    cols = ["variant", "lr", "grad_clip", "steps", "spikes", "diverged", "failed", "first_val_loss", "final_val_loss"]
    return both[cols].sort_values(["grad_clip", "lr", "variant"], ascending=[False, True, True]).reset_index(drop=True)


def setting_label(lr: float, clip: float) -> str:
    return f"{lr:g}" + ("" if clip == 1.0 else " no clip" if clip == 0 else f" clip {clip:g}")


def sweep_verdict(sweep: pd.DataFrame) -> tuple[bool | None, str]:
    """Holds if Peri-LN has fewer spikes + failures than Pre-LN over the sweep and fails at
    no lr where Pre-LN does not; None (not tested) if Pre-LN never spikes or fails."""
    pre, peri = (sweep[sweep.variant == v] for v in SWEEP)
    bad = lambda t: int(t.spikes.sum() + t.failed.sum())  # noqa: E731
    settings = sweep[["lr", "grad_clip"]].drop_duplicates().itertuples(index=False)
    text = (f"- LR sweep ({', '.join(setting_label(s.lr, s.grad_clip) for s in settings)}): Pre-LN {int(pre.spikes.sum())} "
            f"spikes, {int(pre.failed.sum())} failed runs; Peri-LN {int(peri.spikes.sum())} spikes, "
            f"{int(peri.failed.sum())} failed runs")  # fmt: skip
    base_lr = sweep[sweep.steps == "main"].lr.min()
    loss = lambda t, high: t[(t.lr > base_lr) == high].final_val_loss.mean()  # noqa: E731
    text += (f"; mean final validation loss at the sweep's rates Pre-LN {loss(pre, True):.4g}, Peri-LN "
             f"{loss(peri, True):.4g} (at the base lr {base_lr:g}: {loss(pre, False):.4g}, {loss(peri, False):.4g})")  # fmt: skip
    if bad(pre) == 0:
        return None, text + " -> not tested: Pre-LN neither spiked nor failed at these learning rates"
    failed_at = lambda t: set(zip(t[t.failed].lr, t[t.failed].grad_clip, strict=True))  # noqa: E731
    peri_only = failed_at(peri) - failed_at(pre)
    holds = bad(peri) < bad(pre) and not peri_only
    return holds, text + (" -> holds" if holds else " -> does not hold")


def main(argv: list[str] | None = None) -> None:
    args = C.claim_args(NAME, argv)
    out = Path(args.out)
    tables = C.load_campaign(Path(args.campaign))
    m = C.measures(tables)
    table = C.test_parts(parts(m))
    sweep = sweep_table(tables)
    sweep_holds, sweep_text = sweep_verdict(sweep)
    word = C.overall_verdict(table)
    if sweep_holds is not None and word == "reproduced" and not sweep_holds:
        word = "partly reproduced"
    elif sweep_holds and word == "not reproduced":
        word = "partly reproduced"
    verdict = f"# Claim 3: Peri-LN — {word}\n\n{C.parts_text(table)}\n{sweep_text}\n"
    per_run = m[["variant", "seed", "log_var_slope", "log_maxabs_slope", "var_last_first"]].sort_values(["variant", "seed"])
    layers = tables["layers"][tables["layers"].group == "main"]
    fig = C.plot_profiles(layers, ["activation_variance", "max_abs_activation"], list(C.VARIANTS),
                          log=("activation_variance", "max_abs_activation"))  # fmt: skip
    C.write_page(out, "Claim 3: Peri-LN — bounded activations and learning-rate stability", [
        ("Verdict", f'<div class="findings">{C.text_tag(verdict)}</div>'),
        ("Tests (paired by seed, Holm over the parts)", C.table_tag(table)),
        ("Activation scale per layer (mean over seeds, band = min..max)", C.figure_tag(fig, "activation profiles")),
        ("Learning-rate sweep: spikes and failures", C.table_tag(sweep)),
        ("Per run", C.table_tag(per_run)),
        ("How", C.text_tag(__doc__)),
    ])  # fmt: skip
    C.finish(out, NAME, argv, verdict, {"tests": table, "per_run": per_run, "lr_sweep": sweep})


if __name__ == "__main__":
    main()
