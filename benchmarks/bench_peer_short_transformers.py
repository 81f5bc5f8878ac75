"""An angular-only analyze pass vs short-transformers computing the same l x n matrix.

short-transformers 1.0.0 (``pip install -e '.[bench]'``) wraps every decoder layer's forward
and, per example, computes the angular distance between every pair of layer states
(Gromov et al. 2024), averaging over examples: the same quantity as depthprobe's
``angular_distance.csv``. Both sides see the same windows: real SmolLM2-135M, 4 windows x
256 tokens of the built-in text, fp32 on CPU. short-transformers takes one example per
forward (its batch path needs a ``datasets`` object); depthprobe uses its default batch.

Goal (issue 12): depthprobe <= 1.0x short-transformers.

    .venv/bin/python benchmarks/bench_peer_short_transformers.py [--num-sequences 4] [--seq-len 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import alternate, report  # noqa: E402

import depthprobe  # noqa: E402

try:
    from short_transformers import ShortTransformer
    from short_transformers.dist import angular_distance_all_tokens
except ImportError:  # the peer is an optional extra
    sys.exit("short-transformers is not installed: pip install -e '.[bench]'")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--num-sequences", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    model, tok = depthprobe.load_model("smollm2", device="cpu")
    peer_model, _ = depthprobe.load_model("smollm2", device="cpu")  # the peer patches its model for good
    peer = ShortTransformer.from_model(peer_model)
    peer.set_metric(angular_distance_all_tokens)
    windows = depthprobe.make_windows(tok, num_sequences=args.num_sequences, seq_len=args.seq_len)
    results = {}

    def short_transformers_pass():
        peer.eval()
        with torch.no_grad():
            for window in windows.input_ids:  # what ShortTransformer.analyse_layers does per example
                peer(input_ids=window[None])
        results["peer"] = peer.memory.result.copy()  # (n-1, l): d(x_l, x_{l+n})
        peer.clear_memory()

    def depthprobe_pass():
        results["depthprobe"] = depthprobe.analyze(model, windows=windows, metrics="angular", progress=False)

    medians = alternate({"short-transformers": short_transformers_pass, "depthprobe angular": depthprobe_pass},
                        repeats=args.repeats)
    report(f"angular l x n matrix (SmolLM2, {args.num_sequences}x{args.seq_len} tokens, torch threads "
           f"{torch.get_num_threads()})", medians, baseline="short-transformers",
           goal="depthprobe <= 1.0x short-transformers")
    ours = results["depthprobe"].angular_distance  # row l, column n
    theirs = results["peer"]
    diffs = [abs(ours.loc[layer, n] - theirs[n - 1, layer]) for layer in ours.index for n in ours.columns
             if np.isfinite(ours.loc[layer, n])]
    print(f"  max |difference| between the two matrices: {max(diffs):.2e} (short-transformers computes in float32)")
    ratio = medians["depthprobe angular"] / medians["short-transformers"]
    print(f"RATIO depthprobe/short-transformers = {ratio:.3f}")


if __name__ == "__main__":
    main()
