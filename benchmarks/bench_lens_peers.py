"""The lenses beside their peers, in one run, on SmolLM2-135M (float32, CPU), same token ids.

1. Logit lens vs TransformerLens 4.3 (``TransformerBridge``, ``accumulated_resid(apply_ln=True,
   incl_mid=True)``): the per-block ``logit_lens_loss`` and ``logit_lens_loss_mid`` against TL's
   ``{l+1}_pre`` / ``final_post`` and ``{l}_mid`` losses (agreement), and the whole-process time
   of ``depthprobe analyze smollm2 --metrics lens`` against a TL script computing the same numbers
   (goal <= 1.0x; TL is handed the token ids, depthprobe tokenizes).
2. Tuned lens vs tuned-lens 0.2's own training loop (``Train.execute``), same windows in the
   same order, same steps, seed and tokens per step: per-block held-out KL(final || lens) of
   both lenses (both scored by ``analyze --metrics tuned-lens``; goal: within 5% on every
   block but the last, and below the logit lens's KL there), the package API's score of
   depthprobe's lens folder (the format, both ways), and the training time of each.

The peers live in their own venvs (their pins clash with each other: tuned-lens's
``TunedLens.from_model`` fails when TransformerLens 4.x is installed); ``make bench-lens-peers``
makes them (torch first, from local disk):

    python3 -m venv /work/venv-lens && /work/venv-lens/bin/pip install torch==2.13.0 && \\
      /work/venv-lens/bin/pip install tuned-lens==0.2.0 torchdata==0.8.0 transformers==5.24.0 gguf
    python3 -m venv /work/venv-tl && /work/venv-tl/bin/pip install torch==2.13.0 && \\
      /work/venv-tl/bin/pip install transformer-lens==4.3.0 transformers==5.24.0 gguf

    .venv/bin/python benchmarks/bench_lens_peers.py [--num-sequences 2 --seq-len 128] \\
        [--lens-steps 8 --lens-num-sequences 2 --lens-seq-len 128] [--skip-tl] [--skip-tuned]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import depthprobe
from depthprobe.config import ProbeConfig, RunOptions
from depthprobe.data import Windows
from depthprobe.model.load import resolve_source
from depthprobe.probes.lens_train import LensTrainConfig, lens_text, step_windows

HERE = Path(__file__).resolve().parent
ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
       **{k: os.environ[k] for k in ("PYTHONPATH", "HOME", "DEPTHPROBE_CACHE") if k in os.environ}}


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=ENV, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(argv)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def logit_lens_part(args, tokenizer, model_dir: str, work: Path) -> None:
    ids = depthprobe.make_windows(tokenizer, num_sequences=args.num_sequences, seq_len=args.seq_len).input_ids
    torch.save(ids, work / "ids.pt")
    dp = [sys.executable, "-m", "depthprobe", "analyze", "smollm2", "--metrics", "lens", "--num-sequences",
          str(args.num_sequences), "--seq-len", str(args.seq_len), "--batch-size", "4", "--dtype", "float32",
          "--out", str(work / "dp"), "--force", "-q", "--no-report"]
    tl = [args.venv_tl + "/bin/python", str(HERE / "peers" / "tl_lens_peer.py"), "--model-dir", model_dir,
          "--ids", str(work / "ids.pt"), "--batch-size", "4", "--json", str(work / "tl.json")]
    times: dict[str, list[float]] = {"depthprobe analyze --metrics lens": [], "TransformerLens 4.3 script": []}
    for _ in range(args.repeats):  # alternated, so load drifts hit both alike
        times["depthprobe analyze --metrics lens"].append(timed(dp))
        times["TransformerLens 4.3 script"].append(timed(tl))
    layers = pd.read_csv(work / "dp" / "layers.csv")
    tl_loss = json.loads((work / "tl.json").read_text())["loss"]
    n = len(layers)
    post = np.array([tl_loss[f"{i + 1}_pre" if i + 1 < n else "final_post"] for i in range(n)])
    mid = np.array([tl_loss[f"{i}_mid"] for i in range(n)])
    print(f"== logit lens vs TransformerLens 4.3, SmolLM2 {args.num_sequences}x{args.seq_len} tokens, "
          f"median of {args.repeats} whole processes (machine shared)")
    print(f"  max |logit_lens_loss - TL resid_post lens|     {np.abs(layers.logit_lens_loss - post).max():.2e} nats")
    print(f"  max |logit_lens_loss_mid - TL resid_mid lens|  {np.abs(layers.logit_lens_loss_mid - mid).max():.2e} nats")
    medians = {k: statistics.median(v) for k, v in times.items()}
    base = medians["TransformerLens 4.3 script"]
    for name, t in medians.items():
        print(f"  {name:<36s} {t:8.2f} s  ({t / base:.3f}x TL)")
    print("  goal: depthprobe <= 1.0x TL")


def tuned_lens_part(args, tokenizer, model_dir: str, work: Path) -> None:
    config = LensTrainConfig(steps=args.lens_steps, num_sequences=args.lens_num_sequences, seq_len=args.lens_seq_len,
                             batch_size=args.lens_batch_size, seed=42)
    text = lens_text(tokenizer, config)
    ordered = torch.cat([text.input_ids[step_windows(s, config, len(text.input_ids))] for s in range(config.steps)])
    torch.save(ordered, work / "train.pt")
    held = depthprobe.make_windows(tokenizer, num_sequences=args.eval_num_sequences, seq_len=args.eval_seq_len)
    torch.save(held.input_ids, work / "eval.pt")
    ours, theirs = work / "dp_lens", work / "tl_lens"
    t_ours = timed([sys.executable, "-m", "depthprobe", "lens", "train", "smollm2", "--steps", str(config.steps),
                    "--num-sequences", str(config.num_sequences), "--seq-len", str(config.seq_len), "--batch-size",
                    str(config.batch_size), "--dtype", "float32", "--out", str(ours), "--force", "-q"])
    t_theirs = timed([args.venv_lens + "/bin/python", str(HERE / "peers" / "tuned_lens_peer.py"), "--model-dir",
                      model_dir, "--train-ids", str(work / "train.pt"), "--eval-ids", str(work / "eval.pt"),
                      "--steps", str(config.steps), "--tokens-per-step", str(config.num_sequences * config.seq_len),
                      "--batch-size", str(config.batch_size), "--out", str(theirs), "--score", str(ours),
                      "--json", str(work / "tuned.json")])
    peer = json.loads((work / "tuned.json").read_text())
    model, _ = depthprobe.load_model("smollm2", dtype="float32", device="cpu")
    windows = Windows(held.input_ids, held.source)
    scored = {name: depthprobe.analyze(model, None, ProbeConfig(metrics="tuned-lens", batch_size=2,
                                                                 options={"lens": str(folder)}),
                                       windows=windows, run=RunOptions(progress=False)).layers
              for name, folder in (("depthprobe", ours), ("tuned-lens", theirs))}
    table = pd.DataFrame({"layer": scored["depthprobe"].layer, "logit_lens_kl": scored["depthprobe"].logit_lens_kl,
                          "tuned_kl_depthprobe": scored["depthprobe"].tuned_lens_kl,
                          "tuned_kl_package": scored["tuned-lens"].tuned_lens_kl,
                          "package_api_on_depthprobe_lens": peer["kl"][str(ours)]})
    table["rel_diff"] = (table.tuned_kl_depthprobe - table.tuned_kl_package) / table.tuned_kl_package
    body = table.iloc[:-1]
    print(f"== tuned lens vs tuned-lens 0.2 Train.execute, {config.steps} steps x {config.num_sequences} windows x "
          f"{config.seq_len} tokens (same windows, order and seed), held-out {held.num_sequences}x{held.seq_len} "
          f"tokens of {held.source}")
    with pd.option_context("display.width", 200, "display.max_rows", 100):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"  max |relative diff| depthprobe vs package lens (blocks 0..L-2): {body.rel_diff.abs().max():.2%} "
          f"(goal <= 5%): {'met' if body.rel_diff.abs().max() <= 0.05 else 'NOT met'}")
    below = (body.tuned_kl_depthprobe < body.logit_lens_kl)
    print(f"  tuned < logit lens KL on {int(below.sum())}/{len(body)} blocks but the last: "
          f"{'met' if below.all() else 'NOT met (blocks ' + str(body.layer[~below].tolist()) + ')'}")
    api = np.abs(table.package_api_on_depthprobe_lens - table.tuned_kl_depthprobe).max()
    print(f"  package API scoring depthprobe's folder vs depthprobe's own score: max |diff| {api:.2e} nats")
    ours_s = json.loads((ours / "lens_training.json").read_text())["train_seconds"]
    print(f"  training loop: depthprobe {ours_s:.1f} s, tuned-lens Train.execute {peer['train_s']:.1f} s: "
          f"{ours_s / peer['train_s']:.3f}x (machine shared); whole processes: depthprobe lens train {t_ours:.1f} s, "
          f"the peer script {t_theirs:.1f} s (its load {peer['load_s']:.1f} s, then training, then scoring 3 lenses)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-sequences", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--lens-steps", type=int, default=8)
    ap.add_argument("--lens-num-sequences", type=int, default=2)
    ap.add_argument("--lens-seq-len", type=int, default=128)
    ap.add_argument("--lens-batch-size", type=int, default=2)
    ap.add_argument("--eval-num-sequences", type=int, default=4)
    ap.add_argument("--eval-seq-len", type=int, default=128)
    ap.add_argument("--venv-lens", default="/work/venv-lens")
    ap.add_argument("--venv-tl", default="/work/venv-tl")
    ap.add_argument("--skip-tl", action="store_true")
    ap.add_argument("--skip-tuned", action="store_true")
    ap.add_argument("--work", default=None, help="Keep the ids, lenses and peer outputs here (default: a temp folder).")
    args = ap.parse_args()
    _, tokenizer = depthprobe.load_model("smollm2", dtype="float32", device="cpu")  # fills the de-quantized cache
    model_dir, _ = resolve_source("smollm2")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.work or tmp
        Path(tmp).mkdir(parents=True, exist_ok=True)
        if not args.skip_tl:
            logit_lens_part(args, tokenizer, model_dir, Path(tmp))
        if not args.skip_tuned:
            tuned_lens_part(args, tokenizer, model_dir, Path(tmp))


if __name__ == "__main__":
    main()
