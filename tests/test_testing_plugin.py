"""The pytest plugin (run through pytester) and the pure assertion helpers."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import depthprobe
from depthprobe.errors import DepthprobeError
from depthprobe.results import AnalysisResult
from depthprobe.testing import (
    assert_grad_norm_ratio,
    assert_layers_contribute,
    assert_matches_baseline,
    assert_no_nan,
)
from tests.tiny_models import build_tiny, tiny_tokenizer

pytest_plugins = ["pytester"]


def _result(**columns) -> AnalysisResult:
    n = len(next(iter(columns.values())))
    layers = pd.DataFrame({"layer": np.arange(n), **{k: np.asarray(v, float) for k, v in columns.items()}})
    summary = {"model": "toy", "objective": "lm_loss", "base_loss": 2.0, "num_tokens": 64, "timings_s": {"pass": 0.1}}
    return AnalysisResult(layers=layers, summary=summary)


# --- assertion helpers on hand-made results -------------------------------------------------


def test_layers_contribute_names_each_layer_below_threshold():
    r = _result(angular_distance=[0.10, 0.001, 0.05, 0.019])
    assert_layers_contribute(r, min_angular_distance=0.001)
    with pytest.raises(AssertionError) as exc:
        assert_layers_contribute(r, min_angular_distance=0.02)
    msg = str(exc.value)
    assert "layer 1: angular_distance = 0.001" in msg and "layer 3: angular_distance = 0.019" in msg
    assert "layer 0" not in msg and "layer 2" not in msg and ">= 0.02" in msg
    assert_layers_contribute(r, min_angular_distance=0.04, layers=[0, 2])  # only those checked


def test_layers_contribute_without_the_metric_is_a_usage_error():
    with pytest.raises(DepthprobeError, match="no angular_distance column"):
        assert_layers_contribute(_result(grad_norm=[1.0, 2.0]))


def test_grad_norm_ratio_names_largest_and_smallest_layer():
    assert_grad_norm_ratio(_result(grad_norm=[1.0, 2.0, 9.0, 4.0]), max_ratio=10)  # 9 / 1
    with pytest.raises(AssertionError) as exc:
        assert_grad_norm_ratio(_result(grad_norm=[2.0, 4.0, 30.0, 8.0]), max_ratio=10)
    msg = str(exc.value)
    assert "grad_norm ratio 15 exceeds 10" in msg  # 30 / 2
    assert "largest at layer 2 = 30" in msg and "smallest at layer 0 = 2" in msg
    with pytest.raises(AssertionError, match="layer 1 = 0"):
        assert_grad_norm_ratio(_result(grad_norm=[1.0, 0.0, 2.0]))


def test_no_nan_names_layer_and_metric_and_skips_not_applicable_columns():
    r = _result(grad_norm=[1.0, math.nan, 2.0], grad_norm_attn=[math.nan] * 3, angular_distance=[0.1, 0.2, math.inf])
    with pytest.raises(AssertionError) as exc:
        assert_no_nan(r)
    msg = str(exc.value)
    assert "layer 1 grad_norm = nan" in msg and "layer 2 angular_distance = inf" in msg
    assert "grad_norm_attn" not in msg  # NaN in every layer: not measured for this model
    assert msg.startswith("2 non-finite")
    with pytest.raises(AssertionError, match="layer 0 grad_norm_attn = nan"):
        assert_no_nan(r, metrics=["grad_norm_attn"])  # named explicitly: checked
    r.layers.loc[1, "grad_norm"] = 1.5
    r.layers.loc[2, "angular_distance"] = 0.3
    assert_no_nan(r)
    r.summary["base_loss"] = None  # a non-finite loss is saved as null
    with pytest.raises(AssertionError, match="base_loss"):
        assert_no_nan(r)


def test_matches_baseline_update_then_compare(tmp_path):
    r = _result(angular_distance=[0.1, 0.2, 0.3], grad_norm=[1.0, 2.0, 3.0])
    folder = tmp_path / "baseline"
    with pytest.raises(AssertionError, match="--depthprobe-update-baseline"):
        assert_matches_baseline(r, folder)
    assert assert_matches_baseline(r, folder, update=True) is None
    summary = json.loads((folder / "summary.json").read_text())
    # sorted, no noisy timings; then the folder's own listing (what AnalysisResult.load reads)
    assert list(summary) == [*sorted(k for k in r.summary if k != "timings_s"), "files"]
    assert sorted(summary["files"]) == sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    table = assert_matches_baseline(r, folder)
    assert table["ok"].all() and len(table) == 3 * 2 + 1  # two metrics x three layers + base_loss
    r.layers.loc[2, "grad_norm"] = 3.3  # +10% > rtol 5%
    with pytest.raises(AssertionError) as exc:
        assert_matches_baseline(r, folder)
    assert re.search(r"^\s*2\s+grad_norm\s+3\s+3\.3\b", str(exc.value), re.M), str(exc.value)
    assert_matches_baseline(r, folder, rtol=0.2)


# --- the plugin, through pytester -------------------------------------------------------------


@pytest.fixture(scope="module")
def dead_layer_dir(tmp_path_factory):
    """A tiny Llama whose block 2 writes nothing into the residual stream (o_proj and
    down_proj zeroed), so block 2 returns its input and its angular distance is 0."""
    model = build_tiny("llama", seed=0)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    folder = tmp_path_factory.mktemp("tiny-dead")
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


USER_TESTS = """
from depthprobe.testing import assert_layers_contribute, assert_no_nan
from depthprobe.testing.plugin import STATE

OPTIONS = dict(metrics="angular,variance,grad", num_sequences=2, seq_len=32)

def test_healthy_model_contributes(depthprobe_analyze):
    result = depthprobe_analyze({healthy!r}, **OPTIONS)
    assert_no_nan(result)
    assert_layers_contribute(result, min_angular_distance=0.02)

def test_dead_layer_model_contributes(depthprobe_analyze):
    result = depthprobe_analyze({dead!r}, **OPTIONS)
    assert_no_nan(result)
    assert_layers_contribute(result, min_angular_distance=0.02)

def test_cache(depthprobe_analyze, pytestconfig):
    state = pytestconfig.stash[STATE]
    before = len(state.results)
    a = depthprobe_analyze({healthy!r}, metrics="grad,variance,angular", num_sequences=2, seq_len=32)
    a.layers.loc[0, "angular_distance"] = -1.0  # a copy: the cached result keeps its value
    b = depthprobe_analyze({healthy!r}, **OPTIONS)
    c = depthprobe_analyze({healthy!r}, metrics="angular", num_sequences=2, seq_len=32)
    assert len(state.results) == before + 1  # only c is new; a and b hit the first test's entry
    assert len(state.models) == 2  # healthy and dead, each loaded once
    assert b.layers.loc[0, "angular_distance"] > 0
    assert (b.layers["angular_distance"] == c.layers["angular_distance"]).all()
    assert b.summary["device"] == "cpu"
"""


class _KeepLibraryModules:
    """pytester forgets every module imported during an in-process run when the run ends.
    transformers imports model code lazily and breaks when those modules vanish, so put
    back everything imported during the run except the run's own test modules."""

    def __init__(self, test_root: Path):
        self.test_root = test_root.resolve()
        self.seen: dict = {}

    def pytest_unconfigure(self, config):
        self.seen = dict(sys.modules)

    def restore(self) -> None:
        for name, module in self.seen.items():
            path = getattr(module, "__file__", None)
            if name not in sys.modules and not (path and Path(path).resolve().is_relative_to(self.test_root)):
                sys.modules[name] = module


def _run(pytester, *args):
    """Run pytest in this process (a subprocess would spend ~10 s importing torch and transformers)."""
    keeper = _KeepLibraryModules(pytester.path)
    try:
        return pytester.runpytest("-p", "no:cacheprovider", *args, plugins=[keeper])
    finally:
        keeper.restore()


def test_user_tests_pass_on_a_healthy_model_and_fail_naming_the_dead_layer(pytester, tiny_dir, dead_layer_dir):
    pytester.makepyfile(USER_TESTS.format(healthy=str(tiny_dir("llama")), dead=str(dead_layer_dir)))
    result = _run(pytester, "-v")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_healthy_model_contributes PASSED*", "*test_dead_layer_model_contributes FAILED*"])
    text = result.stdout.str()
    assert re.search(r"1 layer\(s\) of \S+ below angular_distance >= 0.02", text), text
    assert re.search(r"layer 2: angular_distance = \d", text), text
    assert not re.search(r"layer [013]: angular_distance", text)


BASELINE_TEST = """
def test_matches_baseline(depthprobe_analyze, depthprobe_baseline):
    result = depthprobe_analyze({source!r}, metrics="angular,variance,grad", num_sequences=2, seq_len=32)
    depthprobe_baseline(result, "baselines/tiny", rtol=0.05)
"""


def test_update_flag_writes_a_baseline_that_then_passes(pytester, tiny_dir):
    source = tiny_dir("llama")
    pytester.makepyfile(BASELINE_TEST.format(source=str(source)))
    folder = pytester.path / "baselines" / "tiny"

    missing = _run(pytester)
    missing.assert_outcomes(failed=1)
    missing.stdout.fnmatch_lines(["*no baseline in*--depthprobe-update-baseline*"])

    update = _run(pytester, "--depthprobe-update-baseline")
    update.assert_outcomes(passed=1)
    update.stdout.fnmatch_lines(["*1 baseline(s) written:*", f"*{folder}"])

    # the baseline holds what analyze measures on that model with the same options
    model, tok = depthprobe.load_model(str(source), device="cpu")
    direct = depthprobe.analyze(model, tok, metrics="angular,variance,grad", num_sequences=2, seq_len=32, progress=False)
    saved = pd.read_csv(folder / "layers.csv")
    pd.testing.assert_frame_equal(saved, direct.layers, rtol=1e-9, atol=0)
    assert json.loads((folder / "summary.json").read_text())["base_loss"] == pytest.approx(direct.summary["base_loss"])

    _run(pytester).assert_outcomes(passed=1)

    saved.loc[saved.layer == 1, "activation_variance"] *= 3
    saved.to_csv(folder / "layers.csv", index=False, float_format="%.10g")
    moved = _run(pytester)
    moved.assert_outcomes(failed=1)
    text = moved.stdout.str()
    assert re.search(r"^E?\s+1\s+activation_variance\s", text, re.M), text
    n_values = (len(saved.columns) - 1) * len(saved) + 2  # every metric of every layer + base loss, perplexity
    assert f"1 of {n_values} values" in text
    assert "rerun with --depthprobe-update-baseline" in text


def test_options_are_listed_in_help(pytester):
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*depthprobe*", "*--depthprobe-update-baseline*", "*--depthprobe-device*"])


@pytest.mark.slow
def test_fixture_on_smollm2(depthprobe_analyze):
    result = depthprobe_analyze("smollm2", metrics="angular,grad", num_sequences=1, seq_len=32)
    assert result.num_layers == 30 and result.summary["model"] == "smollm2"
    assert_no_nan(result)
    lowest = result.layers.nsmallest(3, "angular_distance")
    threshold = float(lowest["angular_distance"].max()) * (1 + 1e-6)
    with pytest.raises(AssertionError) as exc:
        assert_layers_contribute(result, min_angular_distance=threshold)
    named = sorted(int(m) for m in re.findall(r"layer (\d+): angular_distance", str(exc.value)))
    assert named == sorted(lowest["layer"].astype(int))
    grads = result.layers["grad_norm"]
    ratio = grads.max() / grads.min()
    assert_grad_norm_ratio(result, max_ratio=ratio * 1.001)
    with pytest.raises(AssertionError, match=f"largest at layer {int(grads.idxmax())} "):
        assert_grad_norm_ratio(result, max_ratio=ratio * 0.999)
