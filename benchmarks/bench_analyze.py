"""analyze --metrics angular,variance,grad vs one plain forward+backward of the same batches.

Goal (issue "depthprobe analyze"): at most 1.15x. Real SmolLM2-135M, 4 windows x 256 tokens
of the built-in text, batch size 2, fp32 on CPU.

    .venv/bin/python benchmarks/bench_analyze.py [--num-sequences 4] [--seq-len 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import alternate, report  # noqa: E402

import depthprobe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--num-sequences", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    model, tok = depthprobe.load_model("smollm2", device="cpu")
    windows = depthprobe.make_windows(tok, num_sequences=args.num_sequences, seq_len=args.seq_len)

    def plain_forward_backward():
        model.zero_grad(set_to_none=True)
        for batch in windows.batches(args.batch_size):
            out = model(input_ids=batch, labels=batch, use_cache=False)
            (out.loss * batch.shape[0] / windows.num_sequences).backward()
        model.zero_grad(set_to_none=True)

    def depthprobe_analyze():
        depthprobe.analyze(
            model, windows=windows, metrics="angular,variance,grad", batch_size=args.batch_size, progress=False
        )

    medians = alternate({"plain forward+backward": plain_forward_backward, "analyze angular,variance,grad":
                         depthprobe_analyze}, repeats=args.repeats)
    report(
        f"analyze overhead (SmolLM2, {args.num_sequences}x{args.seq_len} tokens, torch threads "
        f"{torch.get_num_threads()})",
        medians,
        baseline="plain forward+backward",
        goal="analyze <= 1.15x plain forward+backward",
    )
    ratio = medians["analyze angular,variance,grad"] / medians["plain forward+backward"]
    print(f"RATIO analyze/plain = {ratio:.3f}")


if __name__ == "__main__":
    main()
