"""Attribution of every block: one shared path (depthprobe) vs captum LayerConductance block
by block (the straightforward baseline). Same numbers (rule="left"), L times fewer passes.

    OMP_NUM_THREADS=1 python benchmarks/bench_attribution.py [--layers 8] [--steps 8]
    OMP_NUM_THREADS=1 python benchmarks/bench_attribution.py --smollm2 --steps 4   # time alone
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.tiny_models, from any folder

import numpy as np  # noqa: E402
import torch  # noqa: E402

from depthprobe.model.stack import LayerStack  # noqa: E402
from depthprobe.probes.attribution import block_conductance, lm_target, mean_embedding  # noqa: E402
from tests.tiny_models import build_tiny, random_ids  # noqa: E402


def baseline(model, stack, ids, steps):
    from captum.attr import LayerConductance

    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    base = mean_embedding(model).expand_as(embeds).clone()
    for p in model.parameters():
        p.requires_grad_(False)
    masses = []
    for block in stack.blocks:
        attr = LayerConductance(lm_target(model), block).attribute(
            embeds, baselines=base, additional_forward_args=(ids,), n_steps=steps, method="riemann_trapezoid"
        )
        masses.append(attr.detach().abs().sum((1, 2)).double().numpy())
    return np.stack(masses)


def time_smollm2(steps: int) -> None:
    import depthprobe
    from depthprobe.data import make_windows

    model, tok = depthprobe.load_model("smollm2", dtype="float32", device="cpu")
    ids = make_windows(tok, num_sequences=4, seq_len=256).input_ids
    t0 = time.perf_counter()
    res = block_conductance(LayerStack.from_model(model), ids, steps=steps, batch_size=4, progress=True)
    seconds = time.perf_counter() - t0
    rel = np.abs(res.convergence_delta).max() / np.abs(res.target - res.baseline_target).max()
    print(f"SmolLM2 4 x 256, {steps} steps: {seconds:.0f} s, max relative convergence delta {rel:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--smollm2", action="store_true", help="time SmolLM2 on 4 x 256 tokens, no baseline")
    args = parser.parse_args()
    if args.smollm2:
        time_smollm2(args.steps)
        return
    model = build_tiny("llama", num_hidden_layers=args.layers, hidden_size=256, intermediate_size=768)
    stack = LayerStack.from_model(model)
    ids = random_ids(4, 128)
    t0 = time.perf_counter()
    ours = block_conductance(stack, ids, steps=args.steps, rule="left")
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = baseline(model, stack, ids, args.steps)
    t_ref = time.perf_counter() - t0
    err = float(np.max(np.abs(ours.conductance - ref) / ref))
    print(f"{args.layers} blocks, {args.steps} steps, 4 x 128 tokens, d=256")
    print(f"captum LayerConductance block by block: {t_ref:.2f} s")
    print(f"depthprobe shared path (all blocks):    {t_ours:.2f} s")
    print(f"speed-up: {t_ref / t_ours:.1f}x   max relative difference: {err:.1e}")


if __name__ == "__main__":
    main()
