"""Variant comparison: equal terms, per-variant summary, paired tests against pre."""

from __future__ import annotations

import json
import math
import statistics

import pandas as pd
import pytest
from scipy import stats

from depthprobe.cli import main
from depthprobe.train.compare import summarize


def test_summary_mean_sd_and_paired_test_by_hand():
    runs = pd.DataFrame(
        {
            "variant": ["pre"] * 4 + ["lns"] * 4 + ["post"] * 4,
            "seed": [0, 1, 2, 3] * 3,
            "final_val_loss": [3.0, 3.2, 3.1, 3.3, 2.9, 3.0, 3.05, 3.1, 3.5, math.nan, 3.6, 3.4],
            "final_val_ppl": [0.0] * 12,
            "diverged": [False] * 9 + [True] + [False] * 2,
        }
    )
    runs["final_val_ppl"] = runs.final_val_loss.map(math.exp)
    s = summarize(runs).set_index("variant")
    lns, pre = [2.9, 3.0, 3.05, 3.1], [3.0, 3.2, 3.1, 3.3]
    assert s.loc["lns", "val_loss_mean"] == pytest.approx(statistics.mean(lns))
    assert s.loc["lns", "val_loss_sd"] == pytest.approx(statistics.stdev(lns))
    d = [a - b for a, b in zip(lns, pre, strict=True)]
    t = statistics.mean(d) / (statistics.stdev(d) / math.sqrt(len(d)))
    assert s.loc["lns", "delta_vs_pre"] == pytest.approx(statistics.mean(d))
    assert s.loc["lns", "ttest_p"] == pytest.approx(2 * stats.t.sf(abs(t), len(d) - 1))
    assert s.loc["lns", "wilcoxon_p"] == pytest.approx(0.125)  # all 4 differences negative: 2 / 2^4
    # the diverged seed of post drops out of its mean and of the pairs
    assert s.loc["post", "num_diverged"] == 1
    assert s.loc["post", "val_loss_mean"] == pytest.approx(statistics.mean([3.5, 3.6, 3.4]))
    assert s.loc["post", "delta_vs_pre"] == pytest.approx(statistics.mean([0.5, 0.5, 0.1]))
    assert math.isnan(s.loc["pre", "ttest_p"])


@pytest.mark.slow
def test_cli_compare_trains_every_variant_on_equal_terms(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = [
        "compare", "--variants", "pre,lns", "--seeds", "2", "--preset", "tiny", "--steps", "3", "--batch-size", "4",
        "--seq-len", "32", "--max-tokens", "40000", "--val-windows", "4", "--warmup", "1", "--device", "cpu",
        "--metrics", "angular,variance,drop", "-q", "--out", str(out),
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    runs = pd.read_csv(out / "comparison.csv")
    assert list(runs.columns[:5]) == ["variant", "seed", "final_val_loss", "final_val_ppl", "diverged"]
    assert sorted(zip(runs.variant, runs.seed, strict=True)) == [("lns", 0), ("lns", 1), ("pre", 0), ("pre", 1)]
    for row in runs.itertuples():  # each row is its run's own final validation loss
        run = json.loads((out / row.variant / f"seed{row.seed}" / "run.json").read_text())
        assert row.final_val_loss == pytest.approx(run["final_val_loss"])
        config = json.loads((out / row.variant / f"seed{row.seed}" / "config.json").read_text())
        assert config["model"]["norm_placement"] == row.variant and config["train"]["seed"] == row.seed
    summary = pd.read_csv(out / "comparison_summary.csv").set_index("variant")
    pre = runs[runs.variant == "pre"].final_val_loss
    assert summary.loc["pre", "val_loss_mean"] == pytest.approx(pre.mean())
    assert summary.loc["pre", "val_loss_sd"] == pytest.approx(statistics.stdev(pre))
    # equal terms: for one seed the runs differ only in the placement (same init and data
    # order follow from the seed: tests/test_train_model.py, tests/test_train_trainer.py)
    for seed in (0, 1):
        a, b = (json.loads((out / v / f"seed{seed}" / "config.json").read_text()) for v in ("pre", "lns"))
        a["model"].pop("norm_placement"), b["model"].pop("norm_placement")
        assert a == b
    layers = pd.read_csv(out / "comparison_layers.csv")
    assert len(layers) == 4 * 4 and {"angular_distance", "activation_variance"} <= set(layers.columns)
    assert "drop_delta_loss" in layers.columns
    # the report holds the first seed of each variant side by side, with the summary table
    from depthprobe.report import load_runs

    shown = load_runs(out)
    assert [r.summary["label"] for r in shown] == ["pre (seed 0)", "lns (seed 0)"]
    pd.testing.assert_frame_equal(shown[0].tables["comparison"], pd.read_csv(out / "comparison_summary.csv"))
    html = (out / "report.html").read_text()
    assert "Comparison" in html and "lns (seed 0)" in html and "Training loss" in html


def test_cli_compare_unknown_variant_is_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--variants", "pre,middle", "--seeds", "1", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error:") and "middle" in err and len(err.splitlines()) == 1


def test_cli_compare_trains_dyt_beside_pre(tmp_path):
    """dyt is a compare variant: it trains (its alpha learns), its model saves and reloads."""
    import depthprobe
    from depthprobe.train.model import DyT

    out = tmp_path / "cmp"
    args = [
        "compare", "--variants", "pre,dyt", "--seeds", "1", "--preset", "tiny", "--steps", "3", "--batch-size", "4",
        "--seq-len", "32", "--max-tokens", "40000", "--val-windows", "4", "--warmup", "1", "--device", "cpu",
        "--metrics", "angular", "--dyt-alpha0", "0.7", "-q", "--no-report", "--out", str(out),
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    runs = pd.read_csv(out / "comparison.csv").set_index("variant")
    assert runs.loc["dyt", "steps_done"] == 3 and not runs.loc["dyt", "diverged"]
    config = json.loads((out / "dyt" / "seed0" / "config.json").read_text())
    assert config["model"]["norm_placement"] == "dyt" and config["model"]["dyt_alpha0"] == 0.7
    model, _ = depthprobe.load_model(str(out / "dyt" / "seed0" / "model"), device="cpu")
    alphas = [float(m.alpha) for m in model.modules() if isinstance(m, DyT)]
    assert len(alphas) == 2 * 4 + 1 and any(abs(a - 0.7) > 1e-6 for a in alphas)  # learned, not frozen
