"""A model larger than its memory budget: a ~3 GB float32 Llama-shaped random model analyzed
with ``--max-memory cpu:1GiB --offload-folder DIR`` (layer-major execution: each block's
weights read once per sweep) against the same analysis in memory.

Builds the checkpoint once, block by block (``benchmarks/_bigmodel.py``), under
``~/.cache/depthprobe-bench/llama-3gb-f32`` (``--model-dir``), then runs each analysis in its
own process with peak anonymous memory (RssAnon) sampled:

1. ``offload``: ``--max-memory cpu:1GiB --offload-folder DIR`` (goal: peak RssAnon < 2 GB);
2. ``memory``: the same analysis with every weight in RAM (the reference numbers);
3. ``offload-batch`` (optional, ``--runs``): offloaded but batch-major (``--execution
   batch``): every block read again at each call, the baseline the layer-major order beats.

and checks that every metric of the offloaded run (every column of ``layers.csv``, the
angular matrix, the per-window drop table, block drops, proxies) equals the in-memory run to
1e-5.

    .venv/bin/python benchmarks/bench_offload.py [--runs offload,memory,offload-batch]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bigmodel import build_random_checkpoint  # noqa: E402
from _peak import gib, run_sampled  # noqa: E402

#: 12 blocks of d2048 (FFN 5632), untied 32k vocabulary: 748 M parameters, 2.99 GB in float32
LLAMA_3GB = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 12,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
GOAL_ANON = 2 * 10**9
RUN_OPTIONS = {
    "offload": ["--max-memory", "cpu:1GiB", "--offload-folder", "{tmp}/offload"],
    "memory": ["--device", "cpu"],
    "offload-batch": ["--max-memory", "cpu:1GiB", "--offload-folder", "{tmp}/offload", "--execution", "batch"],
}


def max_difference(got: Path, ref: Path) -> dict[str, float]:
    """Largest |a - b| / max(1, |b|) of every numeric column of every table the runs share."""
    worst = {}
    for path in sorted(ref.glob("*.csv")):
        want, have = pd.read_csv(path), pd.read_csv(got / path.name)
        numeric = [c for c in want.columns if want[c].dtype.kind in "fi"]
        a, b = have[numeric].to_numpy(float), want[numeric].to_numpy(float)
        both_nan = np.isnan(a) & np.isnan(b)
        worst[path.name] = float(np.max(np.where(both_nan, 0, np.abs(a - b) / np.maximum(1, np.abs(b)))))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model-dir", default="~/.cache/depthprobe-bench/llama-3gb-f32")
    ap.add_argument("--runs", default="offload,memory", help="comma list of offload,memory,offload-batch")
    ap.add_argument("--metrics", default="angular,variance,grad,lens,drop")
    ap.add_argument("--args", default="--num-sequences 2 --seq-len 64 --batch-size 2 --block-sizes 2",
                    help="analysis size")
    args = ap.parse_args()

    import torch

    from depthprobe.model.load import packaged_model_path

    tokenizer_dir, _ = packaged_model_path("minilm")  # a 30,522-token vocabulary fits the 32,000 rows
    folder = build_random_checkpoint(args.model_dir, LLAMA_3GB, str(tokenizer_dir), dtype=torch.float32)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    print(f"model: {folder} ({size / 1e9:.2f} GB of float32 safetensors)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    outs = {}
    with tempfile.TemporaryDirectory(prefix="depthprobe-bench-") as tmp:
        for run in args.runs.split(","):
            options = [o.format(tmp=tmp) for o in RUN_OPTIONS[run]]
            cmd = [sys.executable, "-m", "depthprobe", "analyze", str(folder), "--metrics", args.metrics,
                   *args.args.split(), "--dtype", "float32", *options, "--out", f"{tmp}/{run}", "--no-report", "-q"]
            measured = run_sampled(cmd, env=env)
            print(f"== {run}: {' '.join(cmd[2:])}\n  exit {measured.returncode} in {measured.seconds:.1f} s; "
                  f"peak RssAnon {gib(measured.peak_anon)} ({measured.peak_anon / 1e9:.2f} GB), "
                  f"peak resident {gib(measured.peak_resident)}")
            if measured.returncode:
                print("  " + (measured.output.strip().splitlines() or ["(no output)"])[-1])
                continue
            timings = json.loads(Path(f"{tmp}/{run}/summary.json").read_text())["timings_s"]
            print(f"  timings_s: {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
            if run.startswith("offload"):
                print(f"  goal: peak RssAnon < {GOAL_ANON / 1e9:.0f} GB: "
                      f"{'met' if measured.peak_anon < GOAL_ANON else 'NOT met'}")
            outs[run] = (Path(f"{tmp}/{run}"), measured.seconds)
        if "memory" in outs:
            for run in (r for r in outs if r != "memory"):
                worst = max_difference(outs[run][0], outs["memory"][0])
                print(f"== {run} vs memory: max relative difference per table {json.dumps(worst)}; "
                      f"goal 1e-5: {'met' if max(worst.values()) <= 1e-5 else 'NOT met'}")
        if "offload" in outs and "offload-batch" in outs:
            ratio = outs["offload-batch"][1] / outs["offload"][1]
            print(f"== offloaded, batch-major / layer-major wall time: {ratio:.2f}x")


if __name__ == "__main__":
    main()
