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

import depthprobe
from depthprobe.prune.select import Evaluator, prune_curve
from depthprobe.report import write_report

OUT = Path(__file__).resolve().parent.parent / "reports" / "deep_layers_smollm2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--num-sequences", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-removed", type=int, default=10)
    args = ap.parse_args()

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

    layers = result.layers
    n = len(layers)
    half = n // 2
    ang = layers["angular_distance"].to_numpy()
    drop = layers["drop_delta_loss"].to_numpy()
    cheapest = np.argsort(drop)[:10]
    base = result.summary["base_loss"]
    greedy = curve[curve.strategy == "greedy"]
    within = greedy[greedy["loss"] <= base + math.log(1.05)]["num_removed"].max()
    lines = [
        "# Do SmolLM2's deep layers earn their place?",
        "",
        f"Model: SmolLM2-135M (30 blocks, Pre-RMSNorm), {windows.input_ids.numel()} tokens of built-in text, "
        f"base loss {base:.3f} (perplexity {math.exp(base):.1f}).",
        "",
        f"- Mean angular distance d(x_l, x_l+1): layers 0–{half - 1}: {ang[:half].mean():.3f}; "
        f"layers {half}–{n - 1}: {ang[half:].mean():.3f}.",
        f"- Mean loss increase when one block is dropped: first half {drop[:half].mean():.3f} nats, deeper half "
        f"{drop[half:].mean():.3f} nats.",
        f"- Of the 10 cheapest blocks to drop, {int((cheapest >= half).sum())} are in the deeper half: "
        f"{sorted(int(i) for i in cheapest)}.",
        f"- Greedy pruning removes {int(within)} blocks within a 5% perplexity increase.",
        f"- Spearman correlation of angular distance with drop damage over layers: "
        f"{layers['angular_distance'].rank().corr(layers['drop_delta_loss'].rank()):.2f}.",
        "",
        "Verdict: " + (
            "supported on this model: the deeper half changes the stream less and costs less to drop."
            if ang[half:].mean() < ang[:half].mean() and drop[half:].mean() < drop[:half].mean()
            else "not supported as stated on this model: see the numbers above and report.html."
        ),
        "",
        "Regenerate: `.venv/bin/python analyses/deep_layers_smollm2.py`",
    ]
    (OUT / "verdict.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
