"""Claim (Gromov et al. 2024; Men et al. 2024 "ShortGPT"; Sun et al. 2025 "The Curse of Depth"):
in a Pre-LN LLM the deeper half of the layers changes the residual stream little, and those
layers can be removed with little loss.

Checked small on a CPU with the real SmolLM2-135M (Pre-RMSNorm, 30 blocks) on the built-in
text. Writes reports/deep_layers_smollm2/: the run, its pruning curve, report.html and
verdict.md, whichever way the numbers fall.

    .venv/bin/python analyses/deep_layers_smollm2.py [--num-sequences 4] [--seq-len 256] [--max-removed 10]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd

import depthprobe
from depthprobe.prune.select import Evaluator, prune_curve
from depthprobe.report import write_report
from depthprobe.results import AnalysisResult

OUT = Path(__file__).resolve().parent.parent / "reports" / "deep_layers_smollm2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--num-sequences", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-removed", type=int, default=10)
    ap.add_argument("--verdict-only", action="store_true", help="rewrite verdict.md from the saved run")
    args = ap.parse_args()
    if not args.verdict_only:
        measure(args)
    text = verdict(AnalysisResult.load(OUT), pd.read_csv(OUT / "prune_curve.csv"))
    (OUT / "verdict.md").write_text(text)
    print(text)


def measure(args) -> None:
    model, tok = depthprobe.load_model("smollm2", device="cpu")
    windows = depthprobe.make_windows(tok, num_sequences=args.num_sequences, seq_len=args.seq_len)
    result = depthprobe.analyze(model, windows=windows, metrics="angular,variance,lens,drop", model_name="SmolLM2-135M",
                                options={"block_sizes": [4], "sublayers": False})
    stack = depthprobe.LayerStack.from_model(model)
    curve = prune_curve(Evaluator(stack, windows.input_ids), result.layers, result.angular_distance,
                        args.max_removed)
    result.tables["prune_curve"] = curve
    result.save(OUT)
    write_report([result], OUT / "report.html", title="Do SmolLM2's deep layers earn their place?")


def verdict(result: AnalysisResult, curve: pd.DataFrame) -> str:
    """The claim holds only if all three hold: the deeper half changes the stream less and
    costs less to drop (medians, so the first blocks' huge costs do not decide it), most of
    the cheapest blocks are deep, and greedy removes at least 10% of the blocks within a 5%
    perplexity increase."""
    layers = result.layers
    n = len(layers)
    half = n // 2
    ang = layers["angular_distance"].to_numpy()
    drop = layers["drop_delta_loss"].to_numpy()
    cheapest = np.argsort(drop)[:10]
    deep_cheapest = int((cheapest >= half).sum())
    base = result.summary["base_loss"]
    greedy = curve[curve.strategy == "greedy"]
    within = int(greedy[greedy["loss"] <= base + math.log(1.05)]["num_removed"].max())
    checks = {
        "the deeper half changes the stream less (median angular distance)":
            np.median(ang[half:]) < np.median(ang[:half]),
        "the deeper half costs less to drop (median drop damage)": np.median(drop[half:]) < np.median(drop[:half]),
        "most of the 10 cheapest blocks are in the deeper half": deep_cheapest > 5,
        "greedy removes at least 10% of the blocks within a 5% perplexity increase": within >= math.ceil(0.1 * n),
    }
    failed = [name for name, ok in checks.items() if not ok]
    lines = [
        "# Do SmolLM2's deep layers earn their place?",
        "",
        f"Model: SmolLM2-135M ({n} blocks, Pre-RMSNorm), {result.summary['num_tokens']} tokens of built-in text, "
        f"base loss {base:.3f} (perplexity {math.exp(base):.1f}).",
        "",
        f"- Angular distance d(x_l, x_l+1), median: layers 0–{half - 1}: {np.median(ang[:half]):.3f}; "
        f"layers {half}–{n - 1}: {np.median(ang[half:]):.3f} (means {ang[:half].mean():.3f}, {ang[half:].mean():.3f}).",
        f"- Loss increase when one block is dropped, median: first half {np.median(drop[:half]):.3f} nats, deeper "
        f"half {np.median(drop[half:]):.3f} nats (means {drop[:half].mean():.3f}, {drop[half:].mean():.3f}; the "
        f"most expensive blocks are {sorted(int(i) for i in np.argsort(drop)[-3:])}).",
        f"- Of the 10 cheapest blocks to drop, {deep_cheapest} are in the deeper half: "
        f"{sorted(int(i) for i in cheapest)}; the cheapest costs {drop.min():.3f} nats "
        f"({100 * math.expm1(drop.min()):.1f}% perplexity).",
        f"- Greedy pruning removes {within} blocks within a 5% perplexity increase; removing "
        f"{int(greedy['num_removed'].max())} costs {greedy['loss'].iloc[-1] - base:.3f} nats.",
        f"- Spearman correlation of angular distance with drop damage over layers: "
        f"{layers['angular_distance'].rank().corr(layers['drop_delta_loss'].rank()):.2f}.",
        "",
        "Verdict: " + (
            "supported on this model: " + "; ".join(checks) + "."
            if not failed else
            "not supported on this model. Not true here: " + "; ".join(failed) + "."
        ),
        "",
        "Regenerate: `.venv/bin/python analyses/deep_layers_smollm2.py` (`--verdict-only` rewrites this file from "
        "the saved run).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
