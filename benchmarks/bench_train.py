"""Training throughput: depthprobe's trainer (diagnostics every 50 steps) vs a plain loop
over transformers' LlamaForCausalLM of the same size, batch and data, in one run.

Both train with AdamW and gradient clipping on the same batches; the depthprobe side runs
its whole :meth:`Trainer.fit` (schedule, NaN checks, per-layer diagnostics at step 1, every
50 steps and the last, final validation on 4 windows). Measurements alternate A/B and the medians are compared.

    OMP_NUM_THREADS=1 python benchmarks/bench_train.py [--preset cpu-small] [--steps 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from depthprobe.train.data import DataConfig, load_data
from depthprobe.train.model import PRESETS, ModelConfig
from depthprobe.train.trainer import TrainConfig, Trainer


def llama_tokens_per_s(spec: ModelConfig, cfg: TrainConfig, data, device: str) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
            max_position_embeddings=cfg.seq_len, tie_word_embeddings=False, rms_norm_eps=spec.norm_eps,
        )
    ).to(device)  # fmt: skip
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        ids = data.batch(step, cfg.batch_size).to(device)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the trainer also reads the loss every step
    return cfg.steps * cfg.batch_size * cfg.seq_len / (time.perf_counter() - t0)


def depthprobe_tokens_per_s(spec: ModelConfig, cfg: TrainConfig, data) -> float:
    trainer = Trainer(spec, cfg, DataConfig(), None, data=data, progress=False)
    t0 = time.perf_counter()
    trainer.fit()
    return cfg.steps * cfg.batch_size * cfg.seq_len / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-small", choices=list(PRESETS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, eval_every=0, diag_every=50,
        ckpt_every=0, device=args.device, precision="fp32",
    )  # fmt: skip
    data = load_data(DataConfig(max_tokens=2_000_000, val_windows=4), args.seq_len, seed=0)
    spec = ModelConfig(**PRESETS[args.preset], vocab_size=len(data[1]), norm_placement="pre")
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(depthprobe_tokens_per_s(spec, cfg, data))
        theirs.append(llama_tokens_per_s(spec, cfg, data[0], args.device))
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"preset {args.preset}, batch {args.batch_size}x{args.seq_len}, {args.steps} steps x {args.repeats}, "
          f"{args.device}, torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"depthprobe trainer (diagnostics every 50 steps): {a:,.0f} tokens/s  (runs: {', '.join(f'{x:,.0f}' for x in ours)})")
    print(f"plain LlamaForCausalLM loop:                     {b:,.0f} tokens/s  (runs: {', '.join(f'{x:,.0f}' for x in theirs)})")
    print(f"ratio depthprobe / llama: {a / b:.2f}x  (target >= 0.9x)")


if __name__ == "__main__":
    main()
