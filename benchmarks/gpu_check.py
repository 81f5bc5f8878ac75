"""GPU check (``make gpu-check``, under 5 minutes on one GPU): SmolLM2 analyzed and
drop-swept on CUDA in float32 and bfloat16, compared with the CPU float32 numbers.

Prints, per run: wall time, CUDA peak memory (``summary.json`` ``cuda_peak_memory_bytes``),
and per column the largest difference from CPU float32 relative to the column's scale;
float32 on CUDA must agree to 1e-3 of the scale (TF32 off), bfloat16 is reported with the
rank agreement (Spearman) of the drop column, which is what pruning decisions use.
Writes everything to ``--out`` (default out/gpu-check/gpu_check.json). Exit 1 on a failed
float32 comparison, 2 when no CUDA device is present.

    .venv/bin/python benchmarks/gpu_check.py [--num-sequences 4] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

import depthprobe

METRICS = "angular,variance,grad,lens,drop"
FP32_TOLERANCE = 1e-3  # of each column's largest |value|


def run(device: str, dtype: str, args) -> tuple[object, float]:
    model, tok = depthprobe.load_model("smollm2", device=device, dtype=dtype)
    windows = depthprobe.make_windows(tok, num_sequences=args.num_sequences, seq_len=args.seq_len)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = depthprobe.analyze(model, windows=windows, metrics=METRICS, batch_size=args.batch_size,
                                options={"block_sizes": [2, 4]}, progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return result, seconds


def compare(ref, got) -> dict[str, float]:
    """Largest |got - ref| of each column over the column's largest |ref|."""
    out = {}
    for column in ref.layers.columns:
        if column == "layer" or column not in got.layers:
            continue
        a, b = ref.layers[column].to_numpy(float), got.layers[column].to_numpy(float)
        scale = max(np.nanmax(np.abs(a)), 1e-12)
        out[column] = float(np.nanmax(np.abs(a - b)) / scale)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--num-sequences", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", default="out/gpu-check")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine")
        sys.exit(2)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32
    torch.backends.cudnn.allow_tf32 = False
    ref, cpu_seconds = run("cpu", "float32", args)
    report = {"device": torch.cuda.get_device_name(0), "cpu_float32_seconds": cpu_seconds, "runs": {}}
    failed = False
    for dtype in ("float32", "bfloat16"):
        got, seconds = run("cuda", dtype, args)
        diffs = compare(ref, got)
        drop_rank = float(spearmanr(ref.layers["drop_delta_loss"], got.layers["drop_delta_loss"]).statistic)
        peak = got.summary.get("cuda_peak_memory_bytes")
        ok = dtype != "float32" or max(diffs.values()) <= FP32_TOLERANCE
        failed |= not ok
        report["runs"][dtype] = {"seconds": seconds, "cuda_peak_memory_bytes": peak, "max_rel_diff": diffs,
                                 "drop_spearman": drop_rank, "timings_s": got.summary["timings_s"], "ok": ok}
        worst = max(diffs, key=diffs.get)
        print(f"cuda {dtype:<8s} {seconds:7.2f} s (cpu float32 {cpu_seconds:.2f} s)  peak {peak / 2**30:.2f} GiB  "
              f"worst column {worst} {diffs[worst]:.2e}  drop rank agreement {drop_rank:.3f}  "
              f"{'OK' if ok else 'FAILED'}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
