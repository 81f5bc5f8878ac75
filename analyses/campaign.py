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
import contextlib
import dataclasses
import json
import logging
import multiprocessing as mp
import os
import sys
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analyses._common import RunSpec, campaign_specs, collect, run_dir_of  # noqa: E402
from depthprobe.errors import DepthprobeError  # noqa: E402
from depthprobe.results import AnalysisResult  # noqa: E402
from depthprobe.safeio import pid_alive  # noqa: E402
from depthprobe.train.compare import analyze_run  # noqa: E402
from depthprobe.train.data import DataConfig, load_data  # noqa: E402
from depthprobe.train.trainer import CHECKPOINT, Trainer  # noqa: E402

log = logging.getLogger("campaign")


@contextlib.contextmanager
def claimed(folder: Path):
    """Yield True if this process claimed ``folder`` (``.claimed`` created exclusively, or left
    by a process no longer alive), False if a live process holds it; the claim goes at exit."""
    folder.mkdir(parents=True, exist_ok=True)
    claim = folder / ".claimed"
    try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        pid = int(claim.read_text() or 0)
        if pid > 0 and pid_alive(pid):  # an empty claim (pid 0) was left by a killed writer
            yield False
            return
        claim.unlink(missing_ok=True)  # a stopped worker's claim; take the run over
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:  # another worker took it over first
            yield False
            return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield True
    finally:
        claim.unlink(missing_ok=True)


def require_same_settings(out: Path, model_cfg, train_cfg) -> None:
    """A run folder from other settings (an older campaign) is refused, not resumed or skipped."""
    saved = out / "config.json"
    if not saved.is_file():
        return
    config = json.loads(saved.read_text())
    model = {k: v for k, v in dataclasses.asdict(model_cfg).items() if k not in ("vocab_size", "max_position_embeddings")}
    same_model = all(config["model"].get(k) == v for k, v in model.items())
    if not same_model or config["train"] != dataclasses.asdict(train_cfg):
        raise DepthprobeError(f"{out} holds a run of other settings; pass a fresh --runs folder")


def train_and_analyze(job: tuple[RunSpec, str, dict]) -> dict:
    """One run in a worker process: train (resuming if a checkpoint exists), then analyze."""
    spec, runs_root, setting = job
    torch.set_num_threads(1)  # one thread per worker: OpenMP threads stall badly on a busy machine
    out = run_dir_of(Path(runs_root), spec)
    status = out / "run.json"
    analysis_dir = out / "analysis"
    model_cfg, train_cfg = spec.configs(setting)
    require_same_settings(out, model_cfg, train_cfg)
    analyzed = not spec.analyze or (analysis_dir / "summary.json").is_file()  # sweep runs have no analysis
    if status.is_file() and json.loads(status.read_text()).get("finished") and analyzed:
        return {"spec": dataclasses.asdict(spec), "skipped": True}
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
    ap.add_argument("--variants", default=None, help="comma list: train only these placements' runs (the gathering "
                    "still takes every finished run)")
    ap.add_argument("--collect-only", action="store_true", help="only gather the finished runs into --out")
    ap.add_argument("--shard", default=None, help="K/N: train only runs K, K+N, ... in this process, no gathering "
                    "(start N shards as separate sessions: the kernel's autogroups share a busy CPU per session)")
    ap.add_argument("--claim", action="store_true", help="train whichever run no live process has claimed, one at a "
                    "time, no gathering (start several as separate sessions: they share the runs dynamically)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    setting, specs = campaign_specs(args.smoke)
    todo = [s for s in specs if args.variants is None or s.variant in args.variants.split(",")]
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    if args.claim:
        for spec in todo:
            with claimed(run_dir_of(Path(args.runs), spec)) as mine:
                if mine:
                    log.info("done %s", train_and_analyze((spec, args.runs, setting)))
        return
    if args.shard:
        k, n = (int(x) for x in args.shard.split("/"))
        for spec in todo[k::n]:
            log.info("done %s", train_and_analyze((spec, args.runs, setting)))
        return
    if not args.collect_only:
        jobs = [(spec, args.runs, setting) for spec in todo]
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
