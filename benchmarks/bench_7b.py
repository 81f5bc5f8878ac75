"""The headline command on a 24 GB machine: a Llama-2-7B-shaped random bfloat16 model.

Builds the checkpoint once, block by block (13.8 GB of safetensors, never more than one
block in memory), under ``~/.cache/depthprobe-bench/llama2-7b-shape`` (``--model-dir``),
then runs, each in its own process with peak anonymous memory (RssAnon) sampled:

1. ``depthprobe analyze MODEL --metrics angular,variance,grad,drop --num-sequences 1
   --seq-len 128`` with no dtype or memory option (goal: RssAnon <= 18 GB);
2. the same with ``--max-memory cpu:4GiB --offload-folder DIR`` (goal: < 6 GB);

and prints times, the drop sweep's time against one full forward (``timings_s`` of
``summary.json``), and the ``--dry-run`` estimate against the measured peak (goal: within
25%). Wait for ``free -g`` to show ~17 GB available before running it on a shared machine.

    .venv/bin/python benchmarks/bench_7b.py [--runs default,offload] [--metrics ...]
    .venv/bin/python benchmarks/bench_7b.py --model smollm2 --runs default \
        --extra '--num-sequences 4 --seq-len 256 --batch-size 4'     # the plan against SmolLM2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bigmodel import LLAMA2_7B, build_random_checkpoint  # noqa: E402
from _peak import gib, run_sampled  # noqa: E402

GOALS = {"default": 18 * 10**9, "offload": 6 * 10**9}


def dry_run_estimate(cmd: list[str]) -> tuple[int | None, str]:
    """(estimated peak anonymous bytes, plan text) from ``--dry-run``."""
    measured = run_sampled(cmd + ["--dry-run"])
    match = re.search(r"peak, anonymous memory\s+([\d.]+) GiB", measured.output)
    return (int(float(match.group(1)) * 1024**3) if match else None), measured.output.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model-dir", default="~/.cache/depthprobe-bench/llama2-7b-shape")
    ap.add_argument("--model", default=None, help="measure this model instead (e.g. smollm2); nothing is built")
    ap.add_argument("--runs", default="default,offload", help="comma list of default,offload")
    ap.add_argument("--metrics", default="angular,variance,grad,drop")
    ap.add_argument("--extra", default="", help="extra analyze options, e.g. '--dtype bfloat16' or "
                    "'--num-sequences 4 --seq-len 256 --batch-size 4' (the last of a repeated option counts)")
    args = ap.parse_args()

    from depthprobe.model.load import packaged_model_path

    if args.model is None:
        tokenizer_dir, _ = packaged_model_path("minilm")  # a 30,522-token vocabulary fits Llama's 32,000
        folder = build_random_checkpoint(args.model_dir, LLAMA2_7B, str(tokenizer_dir))
    else:
        folder = args.model
    base = [sys.executable, "-m", "depthprobe", "analyze", str(folder), "--metrics", args.metrics,
            "--num-sequences", "1", "--seq-len", "128", "--block-sizes", "", "-q", *args.extra.split()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for run in args.runs.split(","):
        with tempfile.TemporaryDirectory(prefix="depthprobe-bench-") as tmp:
            options = ["--max-memory", "cpu:4GiB", "--offload-folder", f"{tmp}/offload"] if run == "offload" else []
            cmd = base + options + ["--out", f"{tmp}/out", "--no-report"]
            estimate, plan = dry_run_estimate(base + options)
            print(f"== {run}: {' '.join(cmd[2:])}\n{plan}")
            measured = run_sampled(cmd, env=env)
            summary_path = Path(tmp) / "out" / "summary.json"
            timings = json.loads(summary_path.read_text())["timings_s"] if summary_path.is_file() else {}
        print(f"  exit {measured.returncode} in {measured.seconds:.1f} s; peak RssAnon {gib(measured.peak_anon)} "
              f"(goal {gib(GOALS.get(run, 0))}), peak resident {gib(measured.peak_resident)}")
        if measured.returncode:
            print("  " + measured.output.strip().splitlines()[-1] if measured.output.strip() else "  (no output)")
        if timings:
            print(f"  timings_s: {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
        if estimate:
            print(f"  dry-run estimate {gib(estimate)} vs measured {gib(measured.peak_anon)}: "
                  f"{estimate / max(measured.peak_anon, 1):.2f}x (goal within 25%)")


if __name__ == "__main__":
    main()
