"""``torchrun -m depthprobe analyze``: windows split across processes (gloo), per-layer sums
all-reduced, per-window tables gathered, gradients summed; rank 0 alone writes. The result
equals the one-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from depthprobe.cli import main

ALL = "angular,variance,grad,lens,drop,attribution"


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "depthprobe", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def one_process(args: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code in (0, None)


def assert_same_results(got: Path, ref: Path, tol: float) -> None:
    """Every table (per-layer, angular matrix, per-window drop and attribution, block drops,
    proxies with their bootstrap intervals) and every summary number agree."""
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in ref.iterdir())
    for path in sorted(ref.glob("*.csv")):
        want, have = pd.read_csv(path), pd.read_csv(got / path.name)
        assert list(have.columns) == list(want.columns) and len(have) == len(want), path.name
        for column in want.columns:
            if want[column].dtype.kind in "fiub":
                np.testing.assert_allclose(have[column], want[column], rtol=tol, atol=tol,
                                           err_msg=f"{path.name}:{column}")
            else:
                assert have[column].fillna("").tolist() == want[column].fillna("").tolist(), f"{path.name}:{column}"
    want, have = json.loads((ref / "summary.json").read_text()), json.loads((got / "summary.json").read_text())
    for key, value in want.items():
        if isinstance(value, float):
            assert have[key] == pytest.approx(value, rel=tol, abs=tol), key
    assert have["num_sequences"] == want["num_sequences"] and have["notes"] == want["notes"]


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_on_smollm2(tmp_path):
    args = ["analyze", "smollm2", "--metrics", ALL, "--num-sequences", "4", "--seq-len", "12", "--batch-size", "2",
            "--block-sizes", "2", "--attribution-steps", "2", "--dtype", "float32", "--device", "cpu", "--no-report"]
    run = torchrun([*args, "--out", str(tmp_path / "two")])
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("base loss") == 1  # one table: rank 0 prints, rank 1 is quiet
    assert run.stderr.count("Results written") == 1
    one_process([*args, "--out", str(tmp_path / "one"), "-q"])
    assert_same_results(tmp_path / "two", tmp_path / "one", tol=1e-6)
    layers = pd.read_csv(tmp_path / "two" / "layers.csv")
    assert np.isfinite(layers[["grad_norm", "drop_delta_loss", "attribution", "logit_lens_loss"]]).all().all()


@pytest.mark.slow
def test_uneven_split_layer_major_encoder_and_llama(tmp_path, tiny_dir):
    """5 windows over 2 processes (2 + 3), layer-major execution, an encoder and a decoder."""
    for family, metrics in (("llama", ALL), ("bert", "angular,variance,lens,drop")):
        args = ["analyze", str(tiny_dir(family)), "--metrics", metrics, "--num-sequences", "5", "--seq-len", "12",
                "--batch-size", "2", "--block-sizes", "2", "--attribution-steps", "2", "--execution", "layer",
                "--device", "cpu", "--no-report", "-q"]
        run = torchrun([*args, "--out", str(tmp_path / f"{family}-two")])
        assert run.returncode == 0, run.stderr[-3000:]
        one_process([*args, "--execution", "batch", "--out", str(tmp_path / f"{family}-one")])
        assert_same_results(tmp_path / f"{family}-two", tmp_path / f"{family}-one", tol=1e-6)
