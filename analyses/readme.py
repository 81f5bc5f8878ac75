"""Write reports/README.md from the committed outputs of the claim scripts: one row per claim
(the paper's statement and number, what was measured here with its interval, the verdict,
why it may differ, the command), then each claim's full verdict. Every number in it is read
from a CSV or verdict.md under reports/.

    .venv/bin/python analyses/readme.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analyses import _common as C  # noqa: E402

REPORTS = C.ROOT / "reports"
SCALE = ("{params:.2f} M parameters, {tokens:.2f} M training tokens (byte-level, Python docs and sources) "
         "vs the papers' 71 M-7 B parameters and billions of C4 tokens")  # fmt: skip

#: claim folder -> (paper, statement with the paper's number, rows of tests.csv shown, why it may differ)
CLAIMS = {
    "curse_of_depth": (
        "Sun et al. 2025, Curse of Depth",
        "Pre-LN: deep blocks change the stream less and cost less to drop; variance grows with depth; "
        "LNS (x1/sqrt(l+1)) curbs the growth and makes deep blocks contribute more (shown on LLaMA-family models "
        "of 130M-7B; the paper's per-layer numbers are not quoted here: not verifiable offline).",
        ["Pre-LN deep half changes the stream less", "Pre-LN variance grows with depth", "LNS curbs the variance growth"],
        "The papers' effect builds up with depth and tokens; with 16 narrow blocks and under 1 M tokens the Pre-LN "
        "stream grows little, leaving LNS little growth to curb; LNS also scales every deep sublayer's input down by "
        "1/sqrt(l+1), which after short training plausibly shrinks the deep blocks' updates (their angular distance "
        "is lower here); 3 seeds give t-tests with 2 degrees of freedom.",
    ),
    "mixln_gradients": (
        "Li et al. 2024, Mix-LN",
        "Pre-LN gradient norms shrink with depth, Post-LN's toward the input; Mix-LN's (first 25% Post-LN) are "
        "the most uniform; its deep layers matter more when dropped (LLaMA 71M-1B; its final perplexities agree "
        "with claim 4's table, which quotes them).",
        ["Pre-LN gradients shrink with depth", "Post-LN gradients shrink toward the input", "Mix-LN more uniform than Pre-LN"],
        "Post-LN's vanishing gradients near the input are strongest at large depth, width and learning rate; "
        "here warmup and clipping keep Post-LN trainable at 16 blocks; 3 seeds.",
    ),
    "periln_stability": (
        "Kim et al. 2025, Peri-LN",
        "Peri-LN keeps activation variance and max |activation| bounded with depth where Pre-LN's grow; fewer "
        "loss spikes and no divergence at learning rates where Pre-LN spikes or diverges (400M-3.2B models; the "
        "paper's divergence counts are not quoted here: not verifiable offline).",
        ["Peri-LN variance grows less with depth", "Peri-LN max |activation| grows less with depth"],
        "Massive activations and loss spikes come with many more tokens and larger width. Here AdamW at 15-500x "
        "the base learning rate (0.03-1.0), with or without gradient clipping, made neither placement diverge or "
        "spike after warmup: both ended far above their base-rate loss, and alike (the sweep line in its parts). "
        "At 500x without clipping both blew up early and recovered, Pre-LN further than Peri-LN (first validation "
        "loss in `periln_stability/lr_sweep.csv`): the claimed direction, but one seed, so weak evidence. "
        "Peri-LN's output norms give every sublayer output a fixed "
        "scale, so early in training its stream plausibly grows faster than Pre-LN's (whose sublayer outputs are "
        "still small).",
    ),
    "final_loss": (
        "Sun et al. 2025 Table 1 (Mix-LN the same)",
        "Final C4 perplexity at 130M, equal tokens: Post 26.95, Pre 26.73, Mix 26.07, LNS 25.76 "
        "(LNS 3.6% below Pre, Mix 2.5% below, Post 0.8% above).",
        ["LNS below Pre-LN", "Mix-LN below Pre-LN", "Post-LN above Pre-LN"],
        "Orderings of placements change with depth, width, learning rate and tokens; how close these runs came "
        "to the 2% plateau is in the training-length line above; byte-level text is not C4; 3 seeds.",
    ),
    "dyt_beside": (
        "Zhu et al. 2025, Transformers without Normalization",
        "DyT (gamma*tanh(alpha*x)+beta in place of every norm; for LLMs alpha0 tuned by width with a larger value "
        "for the attention-input DyT, and a learnable scalar sqrt(d) after the embedding) matches normalized "
        "models (LLaMA 7B-70B pre-training loss reported on par with RMSNorm's).",
        [],
        "With the paper's LLM recipe (here attention-input alpha0 1.0, the others 0.5, embedding scalar sqrt(d)) "
        "DyT learns the unigram distribution by the end of warmup and then stalls: every block adds the same "
        "vector, the stream collapses onto one direction shared by every token and grows by orders of magnitude "
        "over depth, the DyT tanh saturates and no gradient reaches the blocks (exactly 0; see its parts). The "
        "paper tuned alpha0 on LLaMA 7B-70B (widths of 4096 and up) with long warmup at lower learning rates; "
        "at d = 64 with 48 warmup steps at lr 2e-3 no variant tried trains.",
    ),
    "real_models": (
        "Curse of Depth / Mix-LN on released models",
        "A Pre-LN LLM's deep layers change the stream less and can be removed cheaply, its variance grows "
        "with depth; a Post-LN model renormalizes the stream after every sublayer.",
        [],
        "Two models of different objective (causal LM vs encoder) and size; one text sample; MiniLM has no LM "
        "head, so its gradients are not measured.",
    ),
    "face_attributes": (
        "Liu et al. 2015, Deep Learning Face Attributes in the Wild",
        "Pre-training matters (LNet on object categories, ANet on identities); LNet, fine-tuned with image-level "
        "attribute tags only, has response maps that locate faces; ANet's high-level units explain each attribute "
        "as a sparse linear combination (CelebA/LFWA: 87%/84% mean attribute accuracy).",
        ["Pre-training raises attribute accuracy", "Response maps locate faces better than the centre",
         "Deep units explain attributes sparsely"],
        "Generated faces (10 drawn attributes on clutter, 64 px), not photographs; a 6-block CNN pre-trained on the "
        "generator's 6-shape task, not on ImageNet categories or identities; a few hundred steps on one CPU core; "
        "one net plays LNet and ANet (no separate localize-then-classify stage); 3 seeds.",
    ),
    "residual_lesion": (
        "Veit et al. 2016, Residual Networks Behave Like Ensembles",
        "Deleting one residual block of a ResNet barely changes its error, while deleting a layer of a plain "
        "(VGG) net breaks it; downsampling blocks are the exception (CIFAR-10 ResNet-110, ImageNet ResNet-200).",
        ["Plain nets break where ResNets do not", "Downsampling blocks matter more"],
        "A 9-block CNN on the generator's 32 px shape task after 300 steps (the papers' nets have 54-200 blocks, "
        "so one block is a far smaller share of the ensemble); the plain net of the same layers barely trains in "
        "that budget (base errors in the verdict), so its blocks have less to break; the plain net's downsampling "
        "blocks cannot be deleted; 3 seeds.",
    ),
}


def verdict_of(folder: Path) -> tuple[str, str]:
    """(verdict word, the full verdict.md) of one claim folder."""
    text = (folder / "verdict.md").read_text().strip()
    return text.splitlines()[0].split(" — ", 1)[-1], text


def measured(reports: Path, name: str, shown: list[str]) -> str:
    """The claim's key numbers, each with its interval, read from its CSVs."""
    folder = reports / name
    if name == "dyt_beside":
        row = pd.read_csv(folder / "vs_pre.csv").set_index("variant").loc["dyt"]
        return f"DyT − Pre val loss {C.fmt_ci(row)} (n={int(row.n)})"
    if name == "real_models":
        m = pd.read_csv(folder / "models.csv")
        s, b = m.iloc[0], m.iloc[1]
        return (f"SmolLM2 deep/shallow drop cost {s.drop_ratio:.3g} [{s.drop_ratio_lo:.3g}, {s.drop_ratio_hi:.3g}], "
                f"angular {s.ang_ratio:.3g}, ln-var slope {s.log_var_slope:.3g}/block; MiniLM drop ratio "
                f"{b.drop_ratio:.3g} [{b.drop_ratio_lo:.3g}, {b.drop_ratio_hi:.3g}], ln-var slope {b.log_var_slope:.3g}")
    tests = pd.read_csv(folder / "tests.csv").set_index("claim")
    parts = [f"{tests.loc[c, 'measure']}: {C.fmt_ci(tests.loc[c])}, Holm p {tests.loc[c, 'p_holm']:.2g}"
             for c in shown if c in tests.index]  # fmt: skip
    if name == "periln_stability":
        sweep = pd.read_csv(folder / "lr_sweep.csv")
        for v in ("pre", "peri"):
            t = sweep[sweep.variant == v]
            labels = [f"{x.lr:g}" + ("" if x.grad_clip == 1.0 else " no clip" if x.grad_clip == 0 else f" clip {x.grad_clip:g}")
                      for x in t[["lr", "grad_clip"]].drop_duplicates().itertuples(index=False)]  # fmt: skip
            parts.append(f"{v}: {int(t.spikes.sum())} spikes, {int(t.failed.sum())} failed runs over lr " + "/".join(labels))
    return "; ".join(parts)


def setting_line(reports: Path) -> str:
    setting = json.loads((reports / "campaign" / "setting.json").read_text())
    runs = pd.read_csv(reports / "campaign" / "runs.csv")
    main = runs[runs.group == "main"]
    tokens = setting["steps"] * setting["batch_size"] * setting["seq_len"] / 1e6
    scale = SCALE.format(params=main.num_parameters.median() / 1e6, tokens=tokens)
    return (f"Campaign: {setting['num_hidden_layers']} blocks, d={setting['hidden_size']}, "
            f"{setting['num_attention_heads']} heads, sequence {setting['seq_len']}, batch {setting['batch_size']}, "
            f"{setting['steps']} steps at lr {setting['lr']:g} (cosine to {setting.get('min_lr_ratio', 0.1):g}x, "
            f"warmup {setting['warmup_steps']}, gradient clip 1.0), "
            f"{main.seed.nunique()} seeds x {main.variant.nunique()} placements ({len(main)} runs) + "
            f"{int((runs.group == 'sweep').sum())} learning-rate sweep runs; {scale}.")  # fmt: skip


def probe_text(reports: Path, name: str) -> str:
    """DyT's row: what the recipe probe (analyses/dyt_alpha0_probe.py) found, from its table."""
    table = reports / "dyt_alpha0_probe" / "probes.csv"
    if name != "dyt_beside" or not table.is_file():
        return ""
    probes = pd.read_csv(table)
    dyt, pre = probes[probes.variant == "dyt"], probes[probes.variant == "pre"].iloc[0]
    stalled = dyt.all_block_grads_zero_from_step.notna()
    return (f" Recipe probe (short runs, [report](dyt_alpha0_probe/report.html)): {int(stalled.sum())}/{len(dyt)} DyT "
            f"variants (alpha0 pairs, embedding scalar none/sqrt(d)/50, half lr) stalled; DyT validation loss "
            f"{dyt.final_val_loss.min():.3g}-{dyt.final_val_loss.max():.3g} vs Pre-LN {pre.final_val_loss:.3g}.")


def training_line(conv: pd.DataFrame, reports: Path) -> str:
    """The plateau check of every main-grid run (from final_loss/convergence.csv)."""
    met = conv[conv.rel_change < 0.02]
    line = (f"Training length: {len(met)}/{len(conv)} runs changed their validation loss by < 2% over the last 20% "
            f"of steps (median {conv.rel_change.median():.2%}, largest {conv.rel_change.max():.2%}; "
            "`final_loss/convergence.csv`)")  # fmt: skip
    stalled = stalled_dyt_seeds(reports)
    note = f"; DyT's {stalled} seeds are flat because they stalled, not because they converged" if stalled else ""
    if len(met) == len(conv):
        return line + f": the issue's < 2% plateau criterion is met by every run{note}."
    missed = ", ".join(f"{r.variant} seed {r.seed} ({r.rel_change:.2%})" for r in conv[conv.rel_change >= 0.02].itertuples())
    return (line + f"{note}. Not met by: {missed}; those comparisons are at equal tokens, short of the plateau.")


def stalled_dyt_seeds(reports: Path) -> int:
    """How many DyT seeds stalled (every block's gradient exactly 0 at some diagnostic step)."""
    beside = reports / "dyt_beside" / "stalled.csv"
    return int(pd.read_csv(beside).stalled.sum()) if beside.is_file() else 0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reports", default=str(REPORTS), help="folder holding the claim folders; README.md goes there")
    reports = Path(ap.parse_args(argv).reports)
    rows, details = [], []
    for i, (name, (paper, statement, shown, why)) in enumerate(CLAIMS.items(), start=1):
        if not (reports / name / "verdict.md").is_file():
            continue
        word, text = verdict_of(reports / name)
        command = (reports / name / "command.txt").read_text().strip()
        cells = [str(i), f"{paper}: {statement}", measured(reports, name, shown), f"**{word}**", why + probe_text(reports, name),
                 f"`{command}` ([report]({name}/report.html))"]  # fmt: skip
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        details.append(f"### {i}. {name}\n\n{text.split(chr(10), 1)[-1].strip()}\n")
    conv = pd.read_csv(reports / "final_loss" / "convergence.csv")
    lines = [
        "# The seed papers' claims, reproduced at CPU scale",
        "",
        "Generated by `analyses/readme.py` from the committed outputs below; `make reports` regenerates "
        "everything (training campaign, then one script per claim; a stopped campaign continues where it "
        "stopped). Intervals are 95% t intervals of paired differences over seeds (same initial weights and "
        "data order per seed across placements), p-values Holm-corrected within each claim; verdict "
        "\"reproduced\" needs every part in the claimed direction with Holm p < 0.05.",
        "",
        setting_line(reports),
        "",
        training_line(conv, reports),
        "",
        "| # | paper: statement and number | measured here (95% interval) | verdict | why it may differ | command |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "Side by side (per-layer gradient norm, variance, angular distance and drop cost of every placement, "
        "first seed each): [`campaign/report.html`](campaign/report.html); mean-over-seed profiles are in each "
        "claim's report.",
        "",
        "## Each claim's parts",
        "",
        *details,
    ]
    (reports / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
