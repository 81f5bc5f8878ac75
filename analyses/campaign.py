"""One training campaign shared by the claims of Curse of Depth, Mix-LN, Peri-LN, LNS and DyT.

Every norm placement (``pre, post, mix, peri, lns, dyt``) is trained for several seeds on
equal terms: for seed s every variant starts from the same linear/embedding weights and sees
the same windows in the same order (``depthprobe.train``), then each final model goes
through :func:`depthprobe.analyze` (angular, variance, grad, drop) on the held-out windows.
A small learning-rate sweep (``pre`` and ``peri``, seed 0) counts loss spikes and divergence.

Each run is resumable (the trainer checkpoints), and a finished run with its analysis is
skipped, so running this again continues a stopped campaign. Runs go to ``--runs`` (not
committed: checkpoints); the tidy tables go to ``--out`` (committed):

- ``runs.csv``: one row per run (variant, seed, lr, steps, final val loss, diverged, ...).
- ``metrics.csv``: every run's per-step ``metrics.csv`` with its run keys.
- ``train_layers.csv``: every run's per-layer gradient norms / variance / angular distance
  over training.
- ``layers.csv``: every final model's per-layer analysis (main grid).
- ``comparison*.csv``, ``summary.json``, ``report.html``: the main grid as a
  ``depthprobe compare`` folder (the report shows every variant side by side).

    .venv/bin/python analyses/campaign.py --runs out/campaign --out reports/campaign [--workers 3]
    .venv/bin/python analyses/campaign.py --smoke --runs /tmp/c --out /tmp/c/report   # seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing as mp
import os
import sys
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analyses._common import RunSpec, campaign_specs, collect, run_dir_of  # noqa: E402

log = logging.getLogger("campaign")


def train_and_analyze(job: tuple[RunSpec, str, dict]) -> dict:
    """One run in a worker process: train (resuming if a checkpoint exists), then analyze."""
    spec, runs_root, setting = job
    import torch

    torch.set_num_threads(1)  # one thread per worker: OpenMP threads stall badly on a busy machine
    from depthprobe.results import AnalysisResult
    from depthprobe.train.compare import analyze_run
    from depthprobe.train.data import DataConfig, load_data
    from depthprobe.train.trainer import CHECKPOINT, Trainer

    out = run_dir_of(Path(runs_root), spec)
    status = out / "run.json"
    analysis_dir = out / "analysis"
    if status.is_file() and json.loads(status.read_text()).get("finished") and (analysis_dir / "summary.json").is_file():
        return {"spec": dataclasses.asdict(spec), "skipped": True}
    model_cfg, train_cfg = spec.configs(setting)
    data_cfg = DataConfig(max_tokens=setting["max_tokens"], val_windows=setting["val_windows"])
    data = load_data(data_cfg, train_cfg.seq_len, train_cfg.seed)
    trainer = Trainer(model_cfg, train_cfg, data_cfg, out, resume=(out / CHECKPOINT).is_file(), progress=False, data=data)
    result = trainer.fit()
    if spec.analyze and not result.diverged:
        analysis = analyze_run(trainer.model, data[0], setting["metrics"], False, name=spec.name)
        analysis.save(analysis_dir)
        AnalysisResult.load(analysis_dir)  # fail here, not later, if it did not save
    return {"spec": dataclasses.asdict(spec), "skipped": False, "seconds": result.seconds}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="out/campaign", help="run folders (checkpoints; not committed)")
    ap.add_argument("--out", default="reports/campaign", help="tidy tables and report (committed)")
    ap.add_argument("--workers", type=int, default=max(1, min(3, os.cpu_count() or 1)))
    ap.add_argument("--smoke", action="store_true", help="tiny settings (a test of the scripts)")
    ap.add_argument("--collect-only", action="store_true", help="only gather the finished runs into --out")
    ap.add_argument("--shard", default=None, help="K/N: train only runs K, K+N, ... in this process, no gathering "
                    "(start N shards as separate sessions: the kernel's autogroups share a busy CPU per session)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    setting, specs = campaign_specs(args.smoke)
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    if args.shard:
        k, n = (int(x) for x in args.shard.split("/"))
        for spec in specs[k::n]:
            log.info("done %s", train_and_analyze((spec, args.runs, setting)))
        return
    if not args.collect_only:
        jobs = [(spec, args.runs, setting) for spec in specs]
        ctx = mp.get_context("spawn")
        with ctx.Pool(args.workers) as pool:
            for done in tqdm(pool.imap_unordered(train_and_analyze, jobs), total=len(jobs), desc="runs"):
                log.info("done %s", done)
    collect(Path(args.runs), Path(args.out), setting, specs)
    command = " ".join(["analyses/campaign.py", *(argv if argv is not None else sys.argv[1:])])
    (Path(args.out) / "command.txt").write_text(f".venv/bin/python {command}\n")
    print(pd.read_csv(Path(args.out) / "runs.csv").to_string(index=False))


if __name__ == "__main__":
    main()
