"""The core seams: typed sweep options, the pass that skips the head, pure statistics, resume."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import depthprobe
from depthprobe.analysis import SWEEPS, ProbeConfig, analyze, measure
from depthprobe.cli.parsing import parse_list
from depthprobe.data import Windows
from depthprobe.errors import DepthprobeError
from depthprobe.probes import drop
from depthprobe.probes.hooks import watch_blocks
from depthprobe.probes.main_pass import PassAccumulator
from depthprobe.probes.objective import Objective
from depthprobe.probes.sweep import DropOptions, SweepOptions, SweepOutput
from depthprobe.runs import DROP_PROGRESS
from depthprobe.stats import with_proxy_statistics
from tests.tiny_models import FAMILY_NAMES, build_tiny, random_ids


@pytest.fixture(scope="module")
def llama():
    return build_tiny("llama")


def test_misspelled_option_fails_loudly(llama):
    with pytest.raises(DepthprobeError, match="unknown analysis option 'block_size'"):
        analyze(llama, windows=Windows(random_ids(2, 8), "r"), metrics="angular", options={"block_size": [2]},
                progress=False)
    with pytest.raises(DepthprobeError, match="--attribution-steps must be at least 1"):
        SweepOptions.parse({"attribution_steps": 0})


def test_flat_options_round_trip():
    options = SweepOptions.parse({"block_sizes": [2, 3], "sublayers": False, "bootstrap_seed": 7})
    assert options.drop == DropOptions(block_sizes=(2, 3), sublayers=False)
    assert options.bootstrap.seed == 7 and options.attribution.steps == 8
    assert SweepOptions.parse(options.flat()) == options


def test_parse_list():
    assert parse_list(" 2, 4,,8 ", "--block-sizes", int) == [2, 4, 8]
    assert parse_list("", "--block-sizes", int) == []
    with pytest.raises(DepthprobeError, match="--remove takes a comma-separated list of integers like 1,2"):
        parse_list("1,x", "--remove", int, "1,2")


def test_angular_only_pass_never_runs_the_head(llama):
    windows = Windows(random_ids(3, 12), "r")
    stack = depthprobe.LayerStack.from_model(llama)
    calls = []
    handle = stack.head.register_forward_hook(lambda *a: calls.append(1))
    try:
        fast = analyze(llama, windows=windows, metrics="angular,variance", progress=False)
        assert calls == [] and fast.summary["base_loss"] is None
        asked = analyze(llama, windows=windows, metrics="angular,variance", loss=True, progress=False)
        assert len(calls) == 1  # one batch of 3 windows through the full model
    finally:
        handle.remove()
    # the stream is the same either way; the loss equals the model's own
    pd.testing.assert_frame_equal(fast.layers, asked.layers)
    with torch.no_grad():
        own = llama(input_ids=windows.input_ids, labels=windows.input_ids, use_cache=False).loss
    assert asked.summary["base_loss"] == pytest.approx(float(own), rel=1e-5)


def test_accumulator_driven_layer_major_matches_analyze(llama):
    """A caller that has the states (here: from output_hidden_states) drives the same object."""
    ids = random_ids(2, 10)
    stack = depthprobe.LayerStack.from_model(llama)
    acc = PassAccumulator(Objective(stack), ("angular", "variance", "lens"))
    with torch.no_grad():
        states = llama.model(input_ids=ids, output_hidden_states=True).hidden_states  # x_0..x_L (last normed)
        raw = []
        with watch_blocks(stack, lambda layer, x_in, x_out: raw.append(x_out)):
            llama.model(input_ids=ids)
    acc.start_batch(ids)
    with torch.no_grad():
        for layer in range(len(stack)):  # layer-major order, states from elsewhere
            acc.on_block(layer, states[layer], raw[layer])
    acc.end_batch()
    got = pd.DataFrame(acc.columns())
    want = analyze(llama, windows=Windows(ids, "r"), metrics="angular,variance,lens", progress=False).layers
    # (the *_mid columns need on_mid calls this caller does not make)
    np.testing.assert_allclose(got.to_numpy(), want[list(got.columns)].to_numpy(), rtol=1e-9)


def test_proxy_statistics_return_a_new_result(llama, monkeypatch):
    def fake_drop(ctx):  # per-window deltas that grow with depth
        n, num_layers = ctx.windows.num_sequences, len(ctx.stack)
        deltas = np.arange(num_layers)[:, None] + 0.1 * np.arange(n)[None, :]
        rows = [{"layer": i, "window": w, "delta_loss": deltas[i, w]} for i in range(num_layers) for w in range(n)]
        return SweepOutput(columns={"drop_delta_loss": deltas.mean(1)}, tables={"drop_windows": pd.DataFrame(rows)})

    monkeypatch.setitem(SWEEPS, "drop", fake_drop)
    raw = measure(llama, None, ProbeConfig(metrics=("angular", "drop")), windows=Windows(random_ids(4, 8), "r"),
                  progress=False)
    before = raw.layers.copy()
    out = with_proxy_statistics(raw, SweepOptions.parse({"bootstrap_samples": 50}).bootstrap)
    pd.testing.assert_frame_equal(raw.layers, before)  # the input is untouched
    assert "proxies" not in raw.tables and "proxy_verdict" not in raw.summary
    assert "proxies" in out.tables and out.summary["bootstrap"]["resamples"] == 50
    # angular distance against a truth rising with depth: rho is the plain rank correlation
    rho = pd.Series(out.layers["angular_distance"]).rank().corr(pd.Series(out.layers["drop_delta_loss"]).rank())
    assert out.tables["proxies"].set_index("proxy").loc["angular_distance", "spearman"] == pytest.approx(rho)


def test_resume_lives_in_analyze(llama, tmp_path, monkeypatch):
    windows = Windows(random_ids(4, 8), "r")
    opts = {"block_sizes": [], "sublayers": False}
    with pytest.raises(DepthprobeError, match="--resume needs --out"):
        analyze(llama, windows=windows, metrics="drop", options=opts, resume=True, progress=False)
    full = analyze(llama, windows=windows, metrics="drop", options=opts, batch_size=2, progress_dir=tmp_path,
                   progress=False)
    assert not (tmp_path / DROP_PROGRESS).exists()  # a complete run removes its progress file
    # a progress file holding every batch: resuming computes nothing and gives the same numbers
    stack = depthprobe.LayerStack.from_model(llama)
    drop.run_drop_sweep(stack, windows.input_ids, batch_size=2, sublayers=False,
                        progress_file=tmp_path / DROP_PROGRESS, progress=False)
    monkeypatch.setattr(drop.BatchScorer, "run", lambda *a, **k: pytest.fail("a finished batch was recomputed"))
    resumed = analyze(llama, windows=windows, metrics="drop", options=opts, batch_size=2, progress_dir=tmp_path,
                      resume=True, progress=False)
    np.testing.assert_allclose(resumed.layers["drop_delta_loss"], full.layers["drop_delta_loss"], rtol=1e-12)
    # without resume a stale file is removed first; with it, a file of another sweep is refused
    monkeypatch.undo()
    for resume in (False, True):
        (tmp_path / DROP_PROGRESS).write_text('{"fingerprint": "another-sweep"}\n')
        if resume:
            with pytest.raises(DepthprobeError, match="different sweep"):
                analyze(llama, windows=windows, metrics="drop", options=opts, batch_size=2, progress_dir=tmp_path,
                        resume=True, progress=False)
        else:  # the stale file is dropped, the sweep measured afresh, and its own file removed at the end
            fresh = analyze(llama, windows=windows, metrics="drop", options=opts, batch_size=2,
                            progress_dir=tmp_path, progress=False)
            np.testing.assert_allclose(fresh.layers["drop_delta_loss"], full.layers["drop_delta_loss"], rtol=1e-12)
            assert not (tmp_path / DROP_PROGRESS).exists()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_stream_only_pass_reads_the_same_stream_on_every_family(family):
    """angular/variance without the head give exactly the columns of a full-model pass."""
    model = build_tiny(family)
    windows = Windows(random_ids(2, 12), "r")
    fast = analyze(model, windows=windows, metrics="angular,variance", progress=False)
    full = analyze(model, windows=windows, metrics="angular,variance", loss=True, progress=False)
    pd.testing.assert_frame_equal(fast.layers, full.layers)
    pd.testing.assert_frame_equal(fast.angular_distance, full.angular_distance)
    assert fast.summary["base_loss"] is None
    assert (full.summary["base_loss"] is not None) == (family != "bert")
