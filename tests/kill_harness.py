"""SIGKILL a depthprobe command at seeded random moments, then resume it; used by test_faults_kill.

Run as ``python -m tests.kill_harness SPEC.json``. The process imports everything once and
runs each command in a forked child (a fresh interpreter per run would cost seconds of
imports each), so ten kills and ten resumes stay cheap. The parent never runs a tensor
operation before forking, and everything runs on one thread, so forking is safe.

SPEC: ``root`` (a folder), ``argv`` (CLI arguments; ``{out}`` is replaced by the run's
folder), ``resume_argv`` (the same run continued), ``fresh_argv`` (used instead when the
kill came before the file ``resume_needs`` existed), ``seed``, ``points``.

Layout written under ``root``: ``ref/`` (uninterrupted run), ``kill{i}/`` (killed then
resumed), ``kill{i}.killed/`` (a copy of what the kill left), ``report.json``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path


def _child(argv: list[str], log: Path) -> int:
    """Fork; the child runs the CLI with ``argv`` (output to ``log``) and exits with its code."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        from depthprobe.cli import main

        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - report anything and leave the child
        import traceback

        traceback.print_exc()
        code = 70
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _fill(argv: list[str], out: Path) -> list[str]:
    return [a.replace("{out}", str(out)) for a in argv]


def run(spec: dict) -> dict:
    root = Path(spec["root"])
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rc_ref = _wait(_child(_fill(spec["argv"], root / "ref"), root / "ref.log"))
    full = time.perf_counter() - t0
    rng = random.Random(spec.get("seed", 0))
    points = []
    for i in range(spec.get("points", 10)):
        out = root / f"kill{i}"
        # up to 0.7 of the reference run's length: a killed run on a less busy machine may be
        # faster than the reference (CI beside a benchmark: 2 of 10 finished before 0.85)
        delay = rng.uniform(0.05, 0.7) * full
        pid = _child(_fill(spec["argv"], out), root / f"kill{i}.log")
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        rc_killed = _wait(pid)
        if out.exists():
            shutil.copytree(out, root / f"kill{i}.killed", symlinks=True)
        needs = spec.get("resume_needs")
        argv = spec["resume_argv"] if not needs or (out / needs).exists() else spec["fresh_argv"]
        rc_resume = _wait(_child(_fill(argv, out), root / f"kill{i}.log"))
        points.append({"delay_s": delay, "killed": rc_killed == -signal.SIGKILL, "rc_killed": rc_killed,
                       "rc_resume": rc_resume, "resumed": argv is spec["resume_argv"]})
    report = {"full_s": full, "rc_ref": rc_ref, "points": points}
    (root / "report.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    import torch

    torch.set_num_threads(1)
    # import everything the commands use once, here (imports run no tensor operations)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401

    import depthprobe.analysis  # noqa: F401
    import depthprobe.cli.analyze  # noqa: F401
    import depthprobe.cli.prune  # noqa: F401
    import depthprobe.cli.train  # noqa: F401
    import depthprobe.prune  # noqa: F401
    import depthprobe.report  # noqa: F401
    import depthprobe.train.trainer  # noqa: F401

    run(json.loads(Path(sys.argv[1]).read_text()))
