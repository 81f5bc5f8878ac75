"""`depthprobe shrink` against the commands it replaces, run one after another on the same settings.

Goal (issue 27): shrink's wall time <= 1.0x the chain

    depthprobe analyze MODEL --metrics angular,drop ...        (the sublayer drop damage)
    depthprobe prune MODEL --num-layers K --strategy greedy ... (K: the blocks that reach the same size)
    depthprobe eval MODEL PRUNED --tasks TASKS ...              (original and pruned)

each a fresh process, timed end to end (model load included) in the same run; shrink does all
of it (its search, the block-only baselines, held-out checks, the export, both evaluations).

    .venv/bin/python benchmarks/bench_shrink.py [--model smollm2] [--target-params 0.9]
        [--num-sequences 2] [--seq-len 32] [--eval-limit 10] [--tasks depthprobe_cloze] [--remeasure N|all]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def timed(args: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "depthprobe", *args], env=ENV, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(args[:2])} failed: {done.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - t0


def blocks_for_fraction(model: str, fraction: float) -> int:
    """Whole blocks a block-only prune must remove to keep at most ``fraction`` of the parameters."""
    code = ("import json,sys,depthprobe;from depthprobe.prune.units import count_params;"
            "m,_=depthprobe.load_model(sys.argv[1],device='cpu');s=depthprobe.LayerStack.from_model(m);"
            "print(json.dumps([count_params(m),[count_params(b) for b in s.blocks]]))")
    out = subprocess.run([sys.executable, "-c", code, model], env=ENV, capture_output=True, text=True, check=True)
    total, blocks = json.loads(out.stdout.strip().splitlines()[-1])
    need = total - fraction * total
    return max(1, math.ceil(need / (sum(blocks) / len(blocks))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--target-params", type=float, default=0.9)
    ap.add_argument("--num-sequences", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--heldout-windows", type=int, default=4)
    ap.add_argument("--tasks", default="depthprobe_cloze")
    ap.add_argument("--eval-limit", type=int, default=10)
    ap.add_argument("--remeasure", default=None, help="passed to shrink (N or all; default: shrink's own)")
    a = ap.parse_args()
    data = ["--num-sequences", str(a.num_sequences), "--seq-len", str(a.seq_len), "--device", "cpu"]
    k = blocks_for_fraction(a.model, a.target_params)
    with tempfile.TemporaryDirectory() as tmp:
        chain = {
            "analyze --metrics angular,drop": ["analyze", a.model, "--metrics", "angular,drop", *data, "--out",
                                               f"{tmp}/analysis", "--no-report", "--quiet"],
            f"prune --num-layers {k} --strategy greedy": ["prune", a.model, "--num-layers", str(k), "--strategy",
                                                          "greedy", *data, "--heldout-windows",
                                                          str(a.heldout_windows), "--out", f"{tmp}/pruned",
                                                          "--no-report", "--quiet"],
            "eval (original, pruned)": ["eval", a.model, f"{tmp}/pruned", "--tasks", a.tasks, "--limit",
                                        str(a.eval_limit), "--out", f"{tmp}/eval", "--device", "cpu"],
        }
        shrink = ["shrink", a.model, "--target-params", str(a.target_params), *data, "--heldout-windows",
                  str(a.heldout_windows), "--eval-tasks", a.tasks, "--eval-limit", str(a.eval_limit), "--out",
                  f"{tmp}/shrunk", "--no-report", "--quiet", *(["--remeasure", str(a.remeasure)] if a.remeasure else [])]
        times = {name: timed(args) for name, args in chain.items()}
        t_shrink = timed(shrink)
        summary = json.loads(Path(f"{tmp}/shrunk/shrink.json").read_text())
    total = sum(times.values())
    print(f"== shrink vs the commands it replaces ({a.model}, {a.num_sequences}x{a.seq_len} tokens, target "
          f"{a.target_params}, tasks {a.tasks} limit {a.eval_limit})")
    for name, t in times.items():
        print(f"  {name:<40s} {t:8.1f} s")
    print(f"  {'chain total':<40s} {total:8.1f} s")
    print(f"  {'shrink':<40s} {t_shrink:8.1f} s  ({summary['num_removed']} units, "
          f"{summary['params_fraction']:.3f} of the parameters kept)")
    print(f"  search: {summary['search']}")
    print(f"  ratio shrink / chain: {t_shrink / total:.3f}x   goal: <= 1.0x")


if __name__ == "__main__":
    main()
