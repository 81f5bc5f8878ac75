"""``--metrics spectra`` against WeightWatcher 0.7.7 on the same weights, in one run.

WeightWatcher's pins clash with nothing of depthprobe's (it is in the ``[bench]`` extra), and it
runs in a subprocess of any python that has it: ``--ww-python`` (default ``$DEPTHPROBE_WW_PYTHON``,
else this python), e.g. a venv of its own made with ``python3 -m venv V && V/bin/pip install
torch==2.13.0 weightwatcher==0.7.7 transformers``. The model is loaded here by depthprobe (float32, CPU),
saved with ``save_pretrained`` to a temporary folder, and loaded there by transformers, so
both sides see the same module tree and the same float32 weights. WW runs ``analyze()`` with
its defaults; depthprobe runs :func:`depthprobe.probes.weight_spectra.spectra_table`. Only those
two calls are timed (not the loads), each in its own process, both with the threads
``OMP_NUM_THREADS`` allows; ``--repeats N`` alternates N runs of each and compares medians.

Printed: the matrices each side analysed and how many match by name (WW's ``longname``),
the largest relative difference per metric over the matched ones (alpha, stable rank,
spectral norm, alpha-weighted; fits WW marks failed, alpha = -1, must be failed here too),
and the time ratio. Goals (issue 28): alpha within 2 %, stable rank within 1e-3, on every
matrix WW analyses; time <= 0.2x WW's. Exit 1 when a goal is missed.

    .venv/bin/python benchmarks/bench_spectra_peer.py smollm2 [--ww-python V/bin/python]
    .venv/bin/python benchmarks/bench_spectra_peer.py minilm
    .venv/bin/python benchmarks/bench_spectra_peer.py tiny-llama  # tiny-gpt2 (Conv1D), tiny-resnet, tiny-convnext, tiny-vit
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
import transformers

import depthprobe
from depthprobe.model.stack import LayerStack
from depthprobe.model.vision import VisionStack
from depthprobe.probes.weight_spectra import block_modules, spectra_table

WW_SCRIPT = r"""
import json, sys, time, logging
import torch, transformers, weightwatcher as ww
logging.getLogger("weightwatcher").setLevel(logging.ERROR)
folder, out = sys.argv[1], sys.argv[2]
config = transformers.AutoConfig.from_pretrained(folder)
model = getattr(transformers, config.architectures[0]).from_pretrained(folder, dtype=torch.float32).eval()
t0 = time.perf_counter()
details = ww.WeightWatcher(model=model).analyze()
seconds = time.perf_counter() - t0
cols = ["longname", "layer_type", "N", "M", "rf", "num_evals", "alpha", "alpha_weighted", "stable_rank",
        "spectral_norm", "xmin", "status"]
details[[c for c in cols if c in details]].to_csv(out + ".csv", index=False)
json.dump({"seconds": seconds, "version": ww.__version__}, open(out + ".json", "w"))
"""
METRICS = {"alpha": 0.02, "stable_rank": 1e-3, "spectral_norm": None, "alpha_weighted": None}  # goal per metric


def tiny(name: str) -> torch.nn.Module:
    """Random tiny models (seeded) whose matrices pass WW's size filters."""
    torch.manual_seed(0)
    if name == "tiny-llama":
        config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2)
        return transformers.LlamaForCausalLM(config)
    if name == "tiny-gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=512, n_embd=64, n_layer=3, n_head=4,
                                                                    n_positions=128))
    if name == "tiny-resnet":
        config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48], depths=[1, 2, 1],
                                           num_labels=10)
        return transformers.ResNetForImageClassification(config)
    if name == "tiny-convnext":  # depthwise (C, 1, 7, 7) kernels: 49 one-value slices pooled
        return transformers.ConvNextForImageClassification(transformers.ConvNextConfig(
            hidden_sizes=[8, 16], depths=[2, 2], num_stages=2, num_labels=10))
    if name == "tiny-vit":
        return transformers.ViTForImageClassification(transformers.ViTConfig(
            hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, image_size=16,
            patch_size=4, num_labels=10))
    raise SystemExit(f"unknown tiny model {name!r}: tiny-llama, tiny-gpt2, tiny-resnet, tiny-convnext or tiny-vit")


def load(name: str) -> torch.nn.Module:
    if name.startswith("tiny-"):
        return tiny(name).eval()
    model, _ = depthprobe.load_model(name, dtype="float32", device="cpu")
    return model


def blocks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    try:
        return block_modules(LayerStack.from_model(model))
    except Exception:  # an image classifier
        return block_modules(VisionStack.from_model(model))


def run_ww(ww_python: str, model: torch.nn.Module, tmp: Path) -> tuple[pd.DataFrame, dict]:
    if not (tmp / "model").is_dir():
        model.save_pretrained(tmp / "model")
    script = tmp / "ww_run.py"
    script.write_text(WW_SCRIPT)
    out = tmp / "ww"
    proc = subprocess.run([ww_python, str(script), str(tmp / "model"), str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"WeightWatcher failed ({ww_python}):\n{proc.stderr[-3000:]}")
    return pd.read_csv(f"{out}.csv"), json.loads(Path(f"{out}.json").read_text())


def compare(ww: pd.DataFrame, ours: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Per matched matrix: relative differences; plus the counts."""
    merged = ww.merge(ours, left_on="longname", right_on="name", how="outer", suffixes=("_ww", ""), indicator=True)
    both = merged[merged["_merge"] == "both"].copy()
    ww_failed = both["alpha_ww"] == -1
    counts = {"ww": len(ww), "depthprobe": len(ours), "matched": len(both),
              "ww_only": sorted(merged.loc[merged["_merge"] == "left_only", "longname"]),
              "depthprobe_only": sorted(merged.loc[merged["_merge"] == "right_only", "name"]),
              "ww_failed_fits": int(ww_failed.sum()),
              "failed_fits_agree": bool(((both["status"] != "success") == ww_failed).all())}
    for metric in METRICS:
        ok = ~ww_failed if "alpha" in metric else np.ones(len(both), bool)
        both[f"rel_{metric}"] = np.where(ok, np.abs(both[metric] - both[f"{metric}_ww"]) / np.abs(both[f"{metric}_ww"]),
                                         np.nan)
    return both, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="smollm2, minilm, a model folder, or tiny-llama / -gpt2 / -resnet / -convnext / -vit")
    ap.add_argument("--ww-python", default=os.environ.get("DEPTHPROBE_WW_PYTHON", sys.executable),
                    help="python of a venv with weightwatcher==0.7.7, torch and transformers (default: "
                    "$DEPTHPROBE_WW_PYTHON, else this python, as after pip install -e '.[bench]')")
    ap.add_argument("--csv", default=None, help="write the per-matrix comparison here")
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs of each side; medians are compared")
    args = ap.parse_args()

    model = load(args.model)
    blocks = blocks_of(model)
    ww_times, times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):  # alternating, so load drifts on a shared machine hit both alike
            ww, meta = run_ww(args.ww_python, model, Path(tmp))
            ww_times.append(meta["seconds"])
            t0 = time.perf_counter()
            ours, _ = spectra_table(model, blocks, progress=False)
            times.append(time.perf_counter() - t0)
    meta["seconds"], seconds = statistics.median(ww_times), statistics.median(times)
    both, counts = compare(ww, ours)
    if args.csv:
        both.to_csv(args.csv, index=False)

    print(f"== spectra vs WeightWatcher {meta['version']} on {args.model} (float32, CPU, {torch.get_num_threads()} "
          "thread(s))")
    print(f"  matrices: WW {counts['ww']}, depthprobe {counts['depthprobe']}, matched by name {counts['matched']}")
    for side in ("ww_only", "depthprobe_only"):
        if counts[side]:
            print(f"  only in {side.split('_')[0]}: {', '.join(counts[side][:8])}{' ...' if len(counts[side]) > 8 else ''}")
    print(f"  failed fits (WW alpha = -1): {counts['ww_failed_fits']}, "
          f"{'the same' if counts['failed_fits_agree'] else 'NOT the same'} matrices here")
    met = counts["matched"] == counts["ww"] and counts["failed_fits_agree"]
    for metric, goal in METRICS.items():
        worst = both[f"rel_{metric}"].max()
        where = both.loc[both[f"rel_{metric}"].idxmax(), "name"] if np.isfinite(worst) else "-"
        verdict = "" if goal is None else f" (goal <= {goal:g}: {'met' if worst <= goal else 'NOT met'})"
        met &= goal is None or bool(worst <= goal)
        print(f"  max relative difference {metric:<15s} {worst:.3g} at {where}{verdict}")
    ratio = seconds / meta["seconds"]
    runs = f" (medians of {args.repeats} alternating runs)" if args.repeats > 1 else ""
    print(f"  time{runs}: WeightWatcher analyze() {meta['seconds']:.2f} s, depthprobe spectra {seconds:.2f} s: "
          f"{ratio:.3f}x (goal <= 0.2x: {'met' if ratio <= 0.2 else 'NOT met'})")
    sys.exit(0 if met and ratio <= 0.2 else 1)


if __name__ == "__main__":
    main()
