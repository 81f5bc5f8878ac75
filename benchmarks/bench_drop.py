"""Prefix-cached drop sweep vs the naive sweep (delete block l, full forward, for every l).

Goal (issue "Layer-drop sweeps"): the sweep costs at most 0.6x the naive sweep. Real
SmolLM2-135M (30 blocks), built-in text, fp32 on CPU; single-block drops only on both sides.

    .venv/bin/python benchmarks/bench_drop.py [--num-sequences 2] [--seq-len 128] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import alternate, report  # noqa: E402

import depthprobe  # noqa: E402
from depthprobe.prune.sweep import per_window_nll, run_drop_sweep  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--num-sequences", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    model, tok = depthprobe.load_model("smollm2", device="cpu")
    ids = depthprobe.make_windows(tok, num_sequences=args.num_sequences, seq_len=args.seq_len).input_ids
    stack = depthprobe.LayerStack.from_model(model)
    L = len(stack)
    results = {}

    @torch.no_grad()
    def naive_sweep():
        base = per_window_nll(model(input_ids=ids, use_cache=False).logits, ids)
        deltas = []
        for layer in range(L):
            with stack.keep_blocks([i for i in range(L) if i != layer]):
                deltas.append(float((per_window_nll(model(input_ids=ids, use_cache=False).logits, ids) - base).mean()))
        results["naive"] = deltas

    def prefix_cached_sweep():
        r = run_drop_sweep(stack, ids, batch_size=args.num_sequences, sublayers=False, progress=False)
        results["cached"] = list((r.block - r.base).mean(1))

    medians = alternate({"naive sweep": naive_sweep, "prefix-cached sweep": prefix_cached_sweep},
                        repeats=args.repeats)
    report(f"drop sweep (SmolLM2, {L} blocks, {args.num_sequences}x{args.seq_len} tokens)", medians,
           baseline="naive sweep", goal="prefix-cached <= 0.6x naive")
    worst = max(abs(a - b) for a, b in zip(results["naive"], results["cached"], strict=True))
    print(f"  max |difference| between the two sweeps: {worst:.2e}")
    print(f"RATIO cached/naive = {medians['prefix-cached sweep'] / medians['naive sweep']:.3f}")


if __name__ == "__main__":
    main()
