"""Bootstrap intervals, rank agreement of proxies with the real drop damage, the verdict,
the pruning-curve table, and the wiring into ``analyze``.

Expected values come from ``scipy.stats`` on the same vectors, straightforward loops over
the same bootstrap resamples, and a naive drop (delete a block, run the model's forward).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats as sps
import torch

from depthprobe.analysis import SWEEPS, SweepOutput, analyze
from depthprobe.data import Windows
from depthprobe.errors import DepthprobeError
from depthprobe.stats import (
    bootstrap_indices,
    drop_delta_interval,
    kendall,
    kendall_rows,
    logit_lens_gain,
    proxy_table,
    prune_excess,
    spearman,
    spearman_rows,
    verdict,
)
from tests.tiny_models import build_tiny, random_ids


# ---------------------------------------------------------------------------- helpers
def long_table(matrix: np.ndarray, value: str = "delta_loss") -> pd.DataFrame:
    """(L, N) -> long (layer, window, value) table, windows in shuffled row order."""
    num_layers, n = matrix.shape
    table = pd.DataFrame(
        {"layer": np.repeat(np.arange(num_layers), n), "window": np.tile(np.arange(n), num_layers), value: matrix.ravel()}
    )
    return table.sample(frac=1.0, random_state=0).reset_index(drop=True)


def synthetic(num_layers: int, n: int, noise: float, seed: int):
    """Per-window drop deltas around a true profile, and a proxy that tracks it loosely."""
    rng = np.random.default_rng(seed)
    true = np.linspace(0.05, 1.0, num_layers) ** 2
    deltas = true[:, None] + noise * rng.standard_normal((num_layers, n))
    proxy = true + 0.15 * np.random.default_rng(99).standard_normal(num_layers)
    layers = pd.DataFrame({"layer": np.arange(num_layers), "angular_distance": proxy, "drop_delta_loss": deltas.mean(1)})
    return layers, long_table(deltas), deltas


def naive_drop(ctx) -> SweepOutput:
    """The truth, straightforwardly: delete block l from the ModuleList, run the model's own
    forward, per-window mean-token loss minus the full model's."""
    stack, ids = ctx.stack, ctx.windows.input_ids

    def window_losses() -> np.ndarray:
        with torch.no_grad():
            logits = stack.model(input_ids=ids, use_cache=False).logits
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        return ce.mean(1).double().numpy()

    base = window_losses()
    rows, column = [], []
    for layer in range(len(stack)):
        with stack.keep_blocks([i for i in range(len(stack)) if i != layer]):
            delta = window_losses() - base
        column.append(delta.mean())
        rows += [{"layer": layer, "window": w, "delta_loss": d} for w, d in enumerate(delta)]
    return SweepOutput(columns={"drop_delta_loss": column}, tables={"drop_windows": pd.DataFrame(rows)})


# ---------------------------------------------------------------------------- rank correlation
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_correlations_equal_scipy(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 6, 20).astype(float)  # ties on purpose
    y = x + rng.normal(0, 2, 20)
    assert spearman(x, y) == pytest.approx(sps.spearmanr(x, y).statistic, abs=1e-12)
    assert kendall(x, y) == pytest.approx(sps.kendalltau(x, y).statistic, abs=1e-12)
    xs = rng.integers(0, 5, (7, 15)).astype(float)
    ys = rng.integers(0, 5, (7, 15)).astype(float)
    expected_rho = [sps.spearmanr(a, b).statistic for a, b in zip(xs, ys, strict=True)]
    expected_tau = [sps.kendalltau(a, b).statistic for a, b in zip(xs, ys, strict=True)]
    np.testing.assert_allclose(spearman_rows(xs, ys), expected_rho, atol=1e-12)
    np.testing.assert_allclose(kendall_rows(xs, ys), expected_tau, atol=1e-12)


def test_constant_vector_gives_nan():
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert np.isnan(kendall([1, 2, 3], [5, 5, 5]))


def test_logit_lens_gain_formula():
    lens = [5.0, 4.0, 4.5, 2.0]
    gain = logit_lens_gain(lens)
    assert np.isnan(gain[0])
    assert gain[1:].tolist() == [lens[0] - lens[1], lens[1] - lens[2], lens[2] - lens[3]]


# ---------------------------------------------------------------------------- drop intervals
def test_drop_interval_matches_a_plain_bootstrap_loop():
    _, table, deltas = synthetic(6, 10, noise=0.2, seed=0)
    ci = drop_delta_interval(table, n_boot=300, seed=5)
    np.testing.assert_allclose(ci["drop_delta_loss"], table.groupby("layer")["delta_loss"].mean())
    idx = bootstrap_indices(10, 300, seed=5)
    for layer in range(6):
        means = [np.mean([deltas[layer, w] for w in draw]) for draw in idx]
        lo, hi = np.percentile(means, [2.5, 97.5])
        assert ci.loc[layer, "drop_delta_loss_lo"] == pytest.approx(lo)
        assert ci.loc[layer, "drop_delta_loss_hi"] == pytest.approx(hi)


def test_drop_interval_contains_estimate_and_shrinks_with_more_windows():
    widths = {}
    for n in (8, 128):
        _, table, _ = synthetic(10, n, noise=0.3, seed=n)
        ci = drop_delta_interval(table, n_boot=500, seed=0)
        assert (ci["drop_delta_loss_lo"] <= ci["drop_delta_loss"]).all()
        assert (ci["drop_delta_loss"] <= ci["drop_delta_loss_hi"]).all()
        widths[n] = (ci["drop_delta_loss_hi"] - ci["drop_delta_loss_lo"]).mean()
    # the width of a mean's interval goes as 1/sqrt(N): 16x windows -> about 4x narrower
    assert widths[128] < widths[8] / 2.5


def test_bootstrap_is_seeded():
    _, table, _ = synthetic(5, 12, noise=0.3, seed=3)
    a = drop_delta_interval(table, n_boot=200, seed=1)
    b = drop_delta_interval(table, n_boot=200, seed=1)
    c = drop_delta_interval(table, n_boot=200, seed=2)
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a["drop_delta_loss_lo"], c["drop_delta_loss_lo"])


# ---------------------------------------------------------------------------- proxies table
def test_proxy_table_point_estimates_equal_scipy_and_intervals_contain_them():
    layers, table, deltas = synthetic(12, 16, noise=0.2, seed=4)
    layers["grad_norm"] = np.random.default_rng(7).random(12)
    layers["logit_lens_loss"] = np.linspace(6, 3, 12) + 0.3 * np.random.default_rng(8).random(12)
    out = proxy_table(layers, table, n_boot=400, seed=0).set_index("proxy")
    truth = deltas.mean(1)
    assert out.loc["angular_distance", "spearman"] == pytest.approx(
        sps.spearmanr(layers["angular_distance"], truth).statistic
    )
    assert out.loc["grad_norm", "kendall"] == pytest.approx(sps.kendalltau(layers["grad_norm"], truth).statistic)
    gain = logit_lens_gain(layers["logit_lens_loss"])
    assert out.loc["logit_lens_gain", "n_layers"] == 11
    assert out.loc["logit_lens_gain", "spearman"] == pytest.approx(sps.spearmanr(gain[1:], truth[1:]).statistic)
    for _, row in out.iterrows():
        assert row["spearman_lo"] <= row["spearman"] <= row["spearman_hi"]
        assert row["kendall_lo"] <= row["kendall"] <= row["kendall_hi"]
        assert row["resampled"] == "fixed"
    assert list(out["spearman"]) == sorted(out["spearman"], reverse=True)


def test_proxy_interval_matches_a_plain_loop_with_per_window_proxy():
    """A per-window proxy is re-summed over each resample's windows; the truth re-averaged."""
    layers, table, deltas = synthetic(8, 10, noise=0.3, seed=5)
    per_window = np.abs(deltas + 0.5 * np.random.default_rng(2).standard_normal(deltas.shape))
    layers["attribution"] = per_window.sum(1) / per_window.sum()
    out = proxy_table(
        layers, table, long_table(per_window, "attribution"), proxies=["attribution"], n_boot=200, seed=3
    ).iloc[0]
    assert out["resampled"] == "windows"
    rhos, taus = [], []
    for draw in bootstrap_indices(10, 200, seed=3):
        truth = deltas[:, draw].mean(1)
        proxy = per_window[:, draw].sum(1)
        rhos.append(sps.spearmanr(proxy, truth).statistic)
        taus.append(sps.kendalltau(proxy, truth).statistic)
    assert out["spearman_lo"] == pytest.approx(np.percentile(rhos, 2.5))
    assert out["spearman_hi"] == pytest.approx(np.percentile(rhos, 97.5))
    assert out["kendall_lo"] == pytest.approx(np.percentile(taus, 2.5))
    assert out["kendall_hi"] == pytest.approx(np.percentile(taus, 97.5))


def test_proxy_interval_shrinks_with_more_windows():
    widths = {}
    for n in (6, 96):
        layers, table, _ = synthetic(15, n, noise=0.6, seed=10 + n)
        row = proxy_table(layers, table, n_boot=400, seed=0).iloc[0]
        assert row["spearman_lo"] <= row["spearman"] <= row["spearman_hi"]
        widths[n] = row["spearman_hi"] - row["spearman_lo"]
    assert widths[96] < widths[6] / 2


def test_proxy_table_rejects_unknown_proxy():
    layers, table, _ = synthetic(4, 5, noise=0.1, seed=0)
    with pytest.raises(DepthprobeError, match="not in the table"):
        proxy_table(layers, table, proxies=["grad_norm"])


# ---------------------------------------------------------------------------- verdict
def _row(proxy, name, rho, lo, hi, n_layers=30):
    return dict(
        proxy=proxy, name=name, spearman=rho, spearman_lo=lo, spearman_hi=hi, kendall=rho - 0.1,
        kendall_lo=lo - 0.1, kendall_hi=hi - 0.1, n_layers=n_layers, n_windows=8, resampled="fixed", text="",
    )  # fmt: skip


def test_verdict_names_the_best_proxy_with_its_interval():
    table = pd.DataFrame(
        [_row("grad_norm", "gradient norm", 0.40, 0.10, 0.60), _row("angular_distance", "angular distance", 0.91, 0.85, 0.95)]
    )
    text = verdict(table)
    assert text.startswith("On this model, angular distance ranks layers closest to the real damage, rho = 0.91 [0.85, 0.95]")
    assert "8 windows, 30 layers" in text and "overlaps" not in text


def test_verdict_says_when_the_runner_up_is_not_separated():
    table = pd.DataFrame(
        [_row("angular_distance", "angular distance", 0.91, 0.80, 0.95), _row("block_influence", "block influence", 0.88, 0.82, 0.93)]
    )
    assert "overlaps that of block influence (rho = 0.88 [0.82, 0.93])" in verdict(table)


def test_verdict_when_no_proxy_is_reliable():
    table = pd.DataFrame([_row("grad_norm", "gradient norm", 0.2, -0.3, 0.6)])
    assert verdict(table).startswith("On this model no proxy ranks layers reliably")


# ---------------------------------------------------------------------------- pruning curve
def test_prune_excess_on_a_hand_made_curve():
    curve = pd.DataFrame(
        {
            "strategy": ["greedy"] * 3 + ["angular"] * 3 + ["drop"] * 2,
            "num_removed": [0, 1, 2, 0, 1, 2, 1, 2],
            "removed": ["", "5", "5,3", "", "6", "6,5", "5", "5,4"],
            "loss": [2.0, 2.1, 2.3, 2.0, 2.4, 2.9, 2.1, 2.35],
            "perplexity": np.exp([2.0, 2.1, 2.3, 2.0, 2.4, 2.9, 2.1, 2.35]),
        }
    )
    out = prune_excess(curve)
    greedy = dict(zip(curve[curve.strategy == "greedy"].num_removed, curve[curve.strategy == "greedy"].loss, strict=True))
    expected = [
        (s, k, loss, loss - greedy[k])
        for s, k, loss in curve[curve.strategy != "greedy"][["strategy", "num_removed", "loss"]].itertuples(index=False)
    ]
    expected.sort()
    assert list(out.columns) == ["strategy", "K", "loss", "greedy_loss", "excess"]
    assert [(r.strategy, r.K, r.loss) for r in out.itertuples()] == [(s, k, loss) for s, k, loss, _ in expected]
    np.testing.assert_allclose(out["excess"], [e for *_, e in expected])


def test_prune_excess_needs_greedy_rows():
    curve = pd.DataFrame({"strategy": ["angular"], "num_removed": [1], "loss": [2.0]})
    with pytest.raises(DepthprobeError, match="no 'greedy' rows"):
        prune_excess(curve)


# ---------------------------------------------------------------------------- wiring
@pytest.fixture(scope="module")
def tiny_llama():
    return build_tiny("llama")


def test_analyze_adds_proxies_when_drop_ran(tiny_llama, monkeypatch, tmp_path):
    monkeypatch.setitem(SWEEPS, "drop", naive_drop)
    windows = Windows(random_ids(6, 12, seed=11), "random")
    result = analyze(
        tiny_llama,
        windows=windows,
        metrics="angular,grad,lens,drop,attribution",
        options={"attribution_steps": 2, "bootstrap_samples": 200},
        progress=False,
    )
    layers = result.layers
    assert (layers["drop_delta_loss_lo"] <= layers["drop_delta_loss"] + 1e-12).all()
    assert (layers["drop_delta_loss"] <= layers["drop_delta_loss_hi"] + 1e-12).all()
    proxies = result.tables["proxies"].set_index("proxy")
    expected = {"angular_distance", "block_influence", "grad_norm", "attribution", "attribution_gxa", "logit_lens_gain"}
    assert set(proxies.index) == expected
    assert proxies.loc["angular_distance", "spearman"] == pytest.approx(
        sps.spearmanr(layers["angular_distance"], layers["drop_delta_loss"]).statistic
    )
    assert proxies.loc["attribution", "resampled"] == "windows"
    assert result.summary["proxy_verdict"].startswith("On this model")
    out = result.save(tmp_path / "run")
    saved = pd.read_csv(out / "proxies.csv")
    assert set(saved["proxy"]) == expected


def test_analyze_without_drop_is_unchanged(tiny_llama):
    result = analyze(tiny_llama, windows=Windows(random_ids(2, 8), "random"), metrics="angular", progress=False)
    assert "proxies" not in result.tables
    assert "drop_delta_loss_lo" not in result.layers


@pytest.mark.slow
def test_smollm2_proxies_csv(smollm2, calibration_file, tmp_path):
    model, tokenizer = smollm2
    result = analyze(
        model,
        tokenizer,
        metrics="angular,grad,lens,drop,attribution",
        num_sequences=4,
        seq_len=128,
        text_file=calibration_file,
        options={"attribution_steps": 2, "block_sizes": [], "sublayers": False},  # single-block drops only
        progress=False,
    )
    out = result.save(tmp_path / "smol")
    proxies = pd.read_csv(out / "proxies.csv").set_index("proxy")
    expected = {"angular_distance", "block_influence", "grad_norm", "attribution", "attribution_gxa", "logit_lens_gain"}
    assert expected <= set(proxies.index)
    numeric = ["spearman", "spearman_lo", "spearman_hi", "kendall", "kendall_lo", "kendall_hi"]
    assert np.isfinite(proxies[numeric].to_numpy()).all()
    layers = pd.read_csv(out / "layers.csv")
    assert np.isfinite(layers[["drop_delta_loss_lo", "drop_delta_loss_hi"]].to_numpy()).all()
    truth = layers["drop_delta_loss"].to_numpy()
    assert proxies.loc["angular_distance", "spearman"] == pytest.approx(
        sps.spearmanr(layers["angular_distance"], truth).statistic
    )
