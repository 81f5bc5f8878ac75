"""Helpers of the fault tests: run the kill harness, compare output folders, check files whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch

from depthprobe.safeio import LOCK_NAME, TMP_MARK

ROOT = Path(__file__).resolve().parents[1]
#: values that legitimately differ between two runs of the same command
VOLATILE_KEYS = {"timings_s", "seconds", "tokens_per_s", "progress_file", "started"}
VOLATILE_COLUMNS = {"tokens_per_s", "seconds"}
JOURNALS = {"drop_progress.jsonl", "greedy_progress.jsonl"}


def run_harness(spec: dict, timeout: float = 600) -> dict:
    """Run ``tests/kill_harness.py`` on ``spec`` in a fresh process; its report."""
    path = Path(spec["root"]).with_suffix(".spec.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.kill_harness", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((Path(spec["root"]) / "report.json").read_text())


def output_files(folder: Path) -> list[Path]:
    """Output files in ``folder`` (relative), without the lock, journals and temporary files."""
    return sorted(
        p.relative_to(folder) for p in folder.rglob("*")
        if p.is_file() and p.name != LOCK_NAME and p.name not in JOURNALS and TMP_MARK not in p.name
    )


def _scrub(value, out: str):
    if isinstance(value, dict):
        return {k: _scrub(v, out) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_scrub(v, out) for v in value]
    if isinstance(value, str):
        return value.replace(out, "{out}")
    return value


def read_output(path: Path, folder: Path):
    """A file's content in a comparable form; raises if the file is not whole."""
    out = str(folder)
    if path.suffix == ".csv":
        frame = pd.read_csv(path)
        return frame.drop(columns=[c for c in frame.columns if c in VOLATILE_COLUMNS])
    if path.suffix == ".json":
        return _scrub(json.loads(path.read_text()), out)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix == ".pt":
        torch.load(path, weights_only=True)  # whole and loadable; its step differs by design
        return None
    if path.suffix == ".html":
        text = path.read_text()
        assert text.rstrip().endswith("</html>"), f"{path} is cut short"
        return None
    return path.read_bytes()


def assert_same(a, b, where: str) -> None:
    if isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=where)
    elif isinstance(a, dict) and a and all(isinstance(v, torch.Tensor) for v in a.values()):
        assert a.keys() == b.keys(), where
        for k in a:
            assert torch.equal(a[k], b[k]), f"{where}: tensor {k} differs"
    elif a is not None:
        assert a == b, where


def assert_prefix(killed: pd.DataFrame, ref: pd.DataFrame, where: str) -> None:
    """A table a kill left is a complete earlier version: the first rows of the final one."""
    assert list(killed.columns) == list(ref.columns), where
    assert len(killed) <= len(ref), where
    pd.testing.assert_frame_equal(killed, ref.iloc[: len(killed)], check_exact=True, obj=where)
