"""Speed of Pre-RMSNorm / Pre-CRMSNorm twins against the original Pre-LN GPT-2 (random weights).

Jiang et al. (2023) report 1-10% faster training and inference after the conversion. This
measures, in one run and on this machine, the forward time (no grad) and the training-step
time (forward + backward + AdamW step) of a GPT-2-shaped model and its two converted twins,
and the time of one norm call alone. Models are timed in turns (original, rmsnorm, crmsnorm,
original, ...), so drifts in machine load hit all three; both the best (min) and the median
of the repeats are printed: on a shared CPU, load only ever adds time, so the min is the
steadier estimate of the cost itself. A ratio below 1 means the converted model is faster.

    OMP_NUM_THREADS=1 python benchmarks/bench_convert.py            # d=256/6 and d=768/12
    OMP_NUM_THREADS=1 python benchmarks/bench_convert.py --quick    # small size only, fewer repeats
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from depthprobe.convert import CRMSNorm, RMSNorm, convert_to_crmsnorm, convert_to_rmsnorm

DEVICE = torch.device("cpu")  # set by --device
SIZES = {"d256-L6": (256, 6, 4), "d768-L12": (768, 12, 12)}  # (hidden, layers, heads)


def gpt2(hidden: int, layers: int, heads: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_embd=hidden, n_layer=layers, n_head=heads, n_positions=1024, vocab_size=50257,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(DEVICE).eval()


def timed(fn, repeats: int, models: dict[str, object]) -> dict[str, tuple[float, float]]:
    """(min, median) seconds of ``fn(model)`` per entry, entries timed in turns, one warm-up each."""
    for model in models.values():
        fn(model)
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            sync()
            start = time.perf_counter()
            fn(model)
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def ratios(seconds: dict[str, tuple[float, float]], name: str, unit: float = 1e3) -> str:
    (best, med), (best0, med0) = seconds[name], seconds["layernorm"]
    return f"min {best * unit:8.1f} (ratio {best / best0:.3f})  median {med * unit:8.1f} (ratio {med / med0:.3f})"


def bench_size(label: str, hidden: int, layers: int, heads: int, batch: int, seq: int, repeats: int) -> None:
    original = gpt2(hidden, layers, heads)
    models = {"layernorm": original, "rmsnorm": convert_to_rmsnorm(original), "crmsnorm": convert_to_crmsnorm(original)}
    ids = torch.randint(0, 50257, (batch, seq), generator=torch.Generator().manual_seed(0)).to(DEVICE)

    @torch.no_grad()
    def forward(model):
        model(input_ids=ids)

    optimizers = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-4) for m in models.values()}

    def train_step(model):
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizers[id(model)].step()
        optimizers[id(model)].zero_grad(set_to_none=True)
        model.eval()

    fwd = timed(forward, repeats, models)
    trn = timed(train_step, repeats, models)
    print(f"{label} (GPT-2 shape, vocab 50257, batch {batch} x {seq} tokens, {repeats} repeats, ms)")
    for name in models:
        print(f"  {name:9s} forward     {ratios(fwd, name)}")
    for name in models:
        print(f"  {name:9s} train step  {ratios(trn, name)}")


def bench_norms(hidden: int, batch: int, seq: int, repeats: int) -> None:
    """One norm call alone on a (batch, seq, d) stream: where the difference comes from."""
    x = torch.randn(batch, seq, hidden, device=DEVICE)
    cases = {  # name -> (norm, its input); CRMSNorm reads the d-1 stored coordinates
        "layernorm": (nn.LayerNorm(hidden).to(DEVICE), x),
        "rmsnorm": (RMSNorm(hidden, 1e-5), x),
        "crmsnorm": (CRMSNorm(hidden, 1e-5), x[..., :-1].contiguous()),
    }
    calls = 50

    @torch.no_grad()
    def call_many(case):
        norm, inp = case
        for _ in range(calls):
            norm(inp)

    seconds = {name: (b / calls, m / calls) for name, (b, m) in timed(call_many, repeats, cases).items()}
    print(f"norm alone, d={hidden}, {batch} x {seq} tokens (no grad, us per call)")
    for name in cases:
        print(f"  {name:9s} {ratios(seconds, name, unit=1e6)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small size only, 3 repeats")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    repeats = 3 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {DEVICE}")
    sizes = dict(list(SIZES.items())[:1]) if args.quick else SIZES
    for label, (hidden, layers, heads) in sizes.items():
        bench_norms(hidden, args.batch, args.seq, repeats)
        bench_size(label, hidden, layers, heads, args.batch, args.seq, repeats)


if __name__ == "__main__":
    main()
