"""Prefix-cached drop sweep vs the naive sweep (delete block l, full forward, for every l).

Goal (issue "Layer-drop sweeps"): the sweep costs at most 0.6x the naive sweep. Single-block
drops only on both sides, fp32 on CPU, two models:

- the real SmolLM2-135M (30 blocks), built-in text. Its 49k-token head and loss cost about
  as much as 9 of its blocks, and every dropped layer still needs the head, which bounds
  what prefix caching can save (README, "Benchmarks");
- a random Llama with Llama-2-7B's proportions scaled down 8x in width (32 blocks, d=512,
  MLP 1376, vocabulary 4000): its head is worth 0.65 of a block, as in Llama-2-7B.

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
from depthprobe.probes.drop import run_drop_sweep  # noqa: E402
from depthprobe.probes.metrics import per_sequence_nll  # noqa: E402


def llama7b_proportions() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=32, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=4000, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def bench(name: str, model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> float:
    stack = depthprobe.LayerStack.from_model(model)
    L = len(stack)
    results = {}

    def per_window_nll(logits, ids):
        return per_sequence_nll(logits, ids).numpy()

    @torch.no_grad()
    def naive_sweep():
        base = per_window_nll(model(input_ids=ids, use_cache=False).logits, ids)
        deltas = []
        for layer in range(L):
            with stack.keep_blocks([i for i in range(L) if i != layer]):
                deltas.append(float((per_window_nll(model(input_ids=ids, use_cache=False).logits, ids) - base).mean()))
        results["naive"] = deltas

    def prefix_cached_sweep():
        r = run_drop_sweep(stack, ids, batch_size=ids.shape[0], sublayers=False, progress=False)
        results["cached"] = list((r.block - r.base).mean(1))

    medians = alternate({"naive sweep": naive_sweep, "prefix-cached sweep": prefix_cached_sweep}, repeats=repeats)
    report(f"drop sweep ({name}, {L} blocks, {ids.shape[0]}x{ids.shape[1]} tokens)", medians,
           baseline="naive sweep", goal="prefix-cached <= 0.6x naive")
    worst = max(abs(a - b) for a, b in zip(results["naive"], results["cached"], strict=True))
    print(f"  max |difference| between the two sweeps: {worst:.2e}")
    ratio = medians["prefix-cached sweep"] / medians["naive sweep"]
    print(f"RATIO {name} cached/naive = {ratio:.3f}")
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--num-sequences", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    model, tok = depthprobe.load_model("smollm2", device="cpu")
    ids = depthprobe.make_windows(tok, num_sequences=args.num_sequences, seq_len=args.seq_len).input_ids
    bench("SmolLM2", model, ids, args.repeats)
    del model
    ids = torch.randint(0, 4000, (args.num_sequences, args.seq_len), generator=torch.Generator().manual_seed(0))
    bench("Llama-2-7B proportions", llama7b_proportions(), ids, args.repeats)


if __name__ == "__main__":
    main()
