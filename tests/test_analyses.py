"""The reproduction analyses (analyses/): their statistics against hand computations, and
the whole pipeline at smoke size (`make reports-smoke`) checked against its own raw tables."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analyses import _common as C

ROOT = Path(__file__).resolve().parent.parent


def test_holm_matches_hand_computation():
    # p sorted: 0.01 (x3), 0.02 (x2), 0.04 (x1); running max; NaN stays out of m
    got = C.holm([0.04, 0.01, math.nan, 0.02])
    assert got[1] == pytest.approx(0.03) and got[3] == pytest.approx(0.04) and got[0] == pytest.approx(0.04)
    assert math.isnan(got[2])
    assert C.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_paired_difference_is_a_paired_t_interval():
    a, b = np.array([1.0, 2.0, 4.0, 3.5]), np.array([0.5, 1.0, 3.0, 3.4])
    d = a - b
    half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2.0
    got = C.paired_difference(a, b)
    assert got["mean_diff"] == pytest.approx(d.mean())
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((d.mean() - half, d.mean() + half))
    assert got["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert got["cohen_dz"] == pytest.approx(d.mean() / d.std(ddof=1))


def test_plateau_spikes_and_profile_measures_by_hand():
    metrics = pd.DataFrame({"step": np.arange(1, 101), "train_loss": np.r_[np.full(60, 2.0), 3.0, np.full(39, 2.0)],
                            "val_loss": [v if s % 10 == 0 else np.nan for s, v in zip(range(1, 101), np.linspace(3, 2, 100), strict=True)]})
    val = metrics.dropna()
    start, end = val[val.step == 80].val_loss.item(), val[val.step == 100].val_loss.item()
    assert C.plateau(metrics)["rel_change"] == pytest.approx(abs(end - start) / start)
    assert C.loss_spikes(metrics, warmup=10) == 1  # step 61: 3.0 > 1.2 x 2.0
    layers = pd.DataFrame({"layer": range(4), "angular_distance": [0.4, 0.2, 0.1, 0.1], "drop_delta_loss": [4, 2, 1, 1],
                           "activation_variance": np.exp([0.0, 1.0, 2.0, 3.0]), "max_abs_activation": [1, 1, 1, 1],
                           "grad_norm": [1.0, 1.0, 1.0, 1.0]})  # fmt: skip
    got = C.profile_measures(layers)
    assert got["ang_ratio"] == pytest.approx(0.1 / 0.3) and got["drop_ratio"] == pytest.approx(1 / 3)
    assert got["log_var_slope"] == pytest.approx(1.0) and got["log_maxabs_slope"] == pytest.approx(0.0)
    assert got["final_grad_cv"] == 0.0 and got["var_last_first"] == pytest.approx(math.exp(3))


@pytest.mark.slow
def test_reports_smoke_pipeline(tmp_path):
    """`make reports-smoke`: every script runs on tiny settings; the gathered tables and the
    claims' numbers agree with the run folders they came from."""
    out = subprocess.run(["make", "-s", "reports-smoke", f"SMOKE_DIR={tmp_path}", "PY=" + sys.executable],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    campaign = tmp_path / "campaign"
    runs = pd.read_csv(campaign / "runs.csv")
    assert set(runs.variant) >= set(C.VARIANTS) and runs.finished.all()
    for row in runs.itertuples():  # the gathered final loss is the run's last validation loss
        folder = C.run_dir_of(tmp_path / "runs", C.RunSpec(row.group, row.variant, row.seed, row.lr, row.steps, grad_clip=row.grad_clip))
        last = pd.read_csv(folder / "metrics.csv").dropna(subset=["val_loss"]).val_loss.iloc[-1]
        assert row.final_val_loss == pytest.approx(last, rel=1e-5)
        assert json.loads((folder / "run.json").read_text())["steps_done"] == row.steps
    # the final-loss claim's Pre-LN difference, recomputed from runs.csv
    main = runs[runs.group == "main"].pivot(index="seed", columns="variant", values="final_val_loss")
    table = pd.read_csv(tmp_path / "final_loss" / "per_variant.csv").set_index("variant")
    assert table.loc["lns", "mean_diff"] == pytest.approx((main.lns - main.pre).mean(), rel=1e-4)
    # Curse of Depth: Pre-LN variance slope recomputed from the final models' layers
    layers = pd.read_csv(campaign / "layers.csv")
    pre = layers[(layers.group == "main") & (layers.variant == "pre")]
    slopes = [np.polyfit(g.layer, np.log(g.activation_variance), 1)[0] for _, g in pre.groupby("seed")]
    tests = pd.read_csv(tmp_path / "curse_of_depth" / "tests.csv").set_index("claim")
    assert tests.loc["Pre-LN variance grows with depth", "mean_diff"] == pytest.approx(np.mean(slopes), rel=1e-4)
    for name in ("campaign", "curse_of_depth", "mixln_gradients", "periln_stability", "final_loss", "dyt_beside",
                 "real_models", "dyt_alpha0_probe", "face_attributes", "residual_lesion"):  # fmt: skip
        assert (tmp_path / name / "report.html").stat().st_size > 1000, name
        assert (tmp_path / name / "command.txt").is_file(), name
    readme = (tmp_path / "README.md").read_text()
    # the vision claims' differences, recomputed from their raw per-run tables
    face = pd.read_csv(tmp_path / "face_attributes" / "runs.csv").pivot(index="seed", columns="arm", values="accuracy")
    face_tests = pd.read_csv(tmp_path / "face_attributes" / "tests.csv").set_index("claim")
    assert face_tests.loc["Pre-training raises attribute accuracy", "mean_diff"] == pytest.approx(
        (face.pretrained - face.scratch).mean(), rel=1e-4, abs=1e-9)
    lesions = pd.read_csv(tmp_path / "residual_lesion" / "lesions.csv")
    kept = lesions[lesions.downsample == 0].groupby(["seed", "arm"]).drop_delta_error.mean().unstack()
    lesion_tests = pd.read_csv(tmp_path / "residual_lesion" / "tests.csv").set_index("claim")
    assert lesion_tests.loc["Plain nets break where ResNets do not", "mean_diff"] == pytest.approx(
        (kept.plain - kept.resnet).mean(), rel=1e-4, abs=1e-9)
    assert readme.count("\n| ") == 1 + 8 and f"{table.loc['lns', 'mean_diff']:+.4g}" in readme
