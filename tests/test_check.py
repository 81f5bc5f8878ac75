"""compare_runs and `depthprobe check`: runs against themselves, edited baselines, bad input."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import depthprobe
from depthprobe.cli import main
from depthprobe.errors import DepthprobeError
from depthprobe.results import AnalysisResult
from depthprobe.testing.compare import compare_runs

METRICS = "angular,variance,grad"


@pytest.fixture(scope="module")
def run_dir(tiny_dir, tmp_path_factory):
    """A real `analyze` output folder of the tiny Llama (2 windows of 16 tokens)."""
    model, tok = depthprobe.load_model(str(tiny_dir("llama")), device="cpu")
    result = depthprobe.analyze(model, tok, metrics=METRICS, num_sequences=2, seq_len=16, progress=False)
    return result.save(tmp_path_factory.mktemp("run"))


def _copy_run(src, dst):
    AnalysisResult.load(src).save(dst)
    return dst


def _run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def _moved(a: float, b: float, rtol: float, atol: float) -> bool:
    """The rule written out: moved when |a - b| > atol + rtol*|b| (b the baseline)."""
    return abs(a - b) > atol + rtol * abs(b)


def test_run_against_itself_every_value_equal(run_dir):
    layers = pd.read_csv(run_dir / "layers.csv")
    table = compare_runs(run_dir, run_dir)
    metric_cols = [c for c in layers.columns if c != "layer"]
    # one row per (metric, layer) plus base_loss and base_perplexity
    assert len(table) == len(metric_cols) * len(layers) + 2
    assert table["ok"].all()
    assert (table["abs_diff"] == 0).all() and (table["rel_diff"] == 0).all()
    per_layer = table[table["layer"].notna()]
    for row in per_layer.itertuples():
        assert row.value == layers.loc[layers.layer == row.layer, row.metric].item()
    assert table.loc[table.metric == "base_loss", "baseline"].item() == depthprobe.AnalysisResult.load(
        run_dir
    ).summary["base_loss"]


def test_differences_and_ok_follow_the_tolerance_rule(run_dir):
    base = AnalysisResult.load(run_dir)
    run = AnalysisResult.load(run_dir)
    rtol, atol = 0.05, 1e-8
    run.layers.loc[1, "angular_distance"] *= 1.2  # moved
    run.layers.loc[3, "grad_norm"] *= 1.01  # within
    run.summary["base_loss"] += 1.0  # moved
    table = compare_runs(run, base, rtol=rtol, atol=atol, metrics=["angular_distance", "grad_norm", "base_loss"])
    for row in table.itertuples():
        if pd.isna(row.layer):
            b, v = base.summary[row.metric], run.summary[row.metric]
        else:
            b = base.layers.loc[base.layers.layer == row.layer, row.metric].item()
            v = run.layers.loc[run.layers.layer == row.layer, row.metric].item()
        assert row.baseline == b and row.value == v
        assert row.abs_diff == pytest.approx(abs(v - b), rel=1e-12, abs=0)
        assert row.rel_diff == pytest.approx(abs(v - b) / abs(b), rel=1e-12, abs=0)
        assert row.ok == (not _moved(v, b, rtol, atol))
    moved = {(None if pd.isna(r.layer) else int(r.layer), r.metric) for r in table.itertuples() if not r.ok}
    assert moved == {(1, "angular_distance"), (None, "base_loss")}


def test_nan_in_both_is_equal_nan_in_one_has_moved(run_dir):
    base = AnalysisResult.load(run_dir)
    run = AnalysisResult.load(run_dir)
    base.layers.loc[0, "grad_norm"] = math.nan
    run.layers.loc[0, "grad_norm"] = math.nan  # both: equal
    run.layers.loc[2, "activation_rms"] = math.nan  # one side: moved
    run.summary["base_loss"] = None  # NaN is saved as JSON null: moved
    table = compare_runs(run, base).set_index(["metric", "layer"])
    assert table.loc[("grad_norm", 0), "ok"] and table.loc[("grad_norm", 0), "abs_diff"] == 0
    assert not table.loc[("activation_rms", 2), "ok"] and table.loc[("activation_rms", 2), "abs_diff"] == np.inf
    loss = table.xs("base_loss", level="metric")
    assert not loss["ok"].item() and math.isnan(loss["value"].item())
    assert int((~table["ok"]).sum()) == 2


def test_check_self_exits_0(run_dir, capsys):
    code, out, _ = _run_cli(["check", str(run_dir), "--baseline", str(run_dir)], capsys)
    assert code == 0
    assert out.startswith("OK:")


def test_check_edited_baseline_exits_1_naming_layer_and_metric(run_dir, tmp_path, capsys):
    baseline = _copy_run(run_dir, tmp_path / "baseline")
    layers = pd.read_csv(baseline / "layers.csv")
    layers.loc[layers.layer == 2, "activation_variance"] *= 1.5  # 50% > rtol 5%
    layers.to_csv(baseline / "layers.csv", index=False, float_format="%.10g")
    code, out, _ = _run_cli(["check", str(run_dir), "--baseline", str(baseline)], capsys)
    assert code == 1
    rows = [line.split() for line in out.splitlines()]
    assert ["2", "activation_variance"] in [r[:2] for r in rows]
    assert len([r for r in rows if r[:1] and r[0].isdigit()]) == 1  # only that value moved
    assert out.splitlines()[-1].startswith("FAIL: 1 of")
    # a looser tolerance lets the same change through
    code, _, _ = _run_cli(["check", str(run_dir), "--baseline", str(baseline), "--rtol", "0.6"], capsys)
    assert code == 0


def test_check_writes_the_full_table(run_dir, tmp_path, capsys):
    out_csv = tmp_path / "diff.csv"
    code, _, _ = _run_cli(["check", str(run_dir), "--baseline", str(run_dir), "--out", str(out_csv)], capsys)
    assert code == 0
    saved = pd.read_csv(out_csv)
    expected = compare_runs(run_dir, run_dir)
    assert list(saved.columns) == list(expected.columns)
    assert len(saved) == len(expected) and saved["ok"].all()


def _fewer_layers(run_dir, dst):
    r = AnalysisResult.load(run_dir)
    r.layers = r.layers.iloc[:-1]
    return r.save(dst)


def _without_grad(run_dir, dst):
    r = AnalysisResult.load(run_dir)
    r.layers = r.layers.drop(columns="grad_norm")
    return r.save(dst)


def _other_tokens(run_dir, dst):
    r = AnalysisResult.load(run_dir)
    r.summary["num_tokens"] *= 2
    return r.save(dst)


@pytest.mark.parametrize(
    "make_run, extra, message",
    [
        (lambda run_dir, dst: dst / "missing", [], "does not exist"),
        (_fewer_layers, [], "has 3 layers but the baseline has 4"),
        (_without_grad, [], "grad_norm missing from the run"),
        (_other_tokens, [], "--num-sequences"),
        (lambda run_dir, dst: run_dir, ["--metrics", "nope"], "nope missing from the baseline"),
        (lambda run_dir, dst: run_dir, ["--rtol", "-1"], "tolerances must be >= 0"),
    ],
    ids=["missing-folder", "layer-count", "missing-metric", "token-count", "unknown-metric", "negative-rtol"],
)
def test_check_bad_input_exits_2_with_one_line(run_dir, tmp_path, capsys, make_run, extra, message):
    run = make_run(run_dir, tmp_path)
    code, out, err = _run_cli(["check", str(run), "--baseline", str(run_dir), *extra], capsys)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]


def test_unreadable_folder_is_a_user_error(run_dir, tmp_path):
    broken = _copy_run(run_dir, tmp_path / "broken")
    (broken / "summary.json").write_text("{not json")
    with pytest.raises(DepthprobeError, match="cannot read the baseline folder"):
        compare_runs(run_dir, broken)
