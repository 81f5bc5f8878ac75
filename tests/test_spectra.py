"""``--metrics spectra``: WeightWatcher's power-law fit against a naive Clauset et al. loop,
norm metrics against numpy's SVD, WW's layer rules, the data-free CLI and the proxy rows.

(The comparison with WeightWatcher 0.7.7 itself is ``benchmarks/bench_spectra_peer.py``: it
needs WW in its own venv.)"""

from __future__ import annotations

import collections
import math

import numpy as np
import pandas as pd
import pytest
import torch
from accelerate.utils.offload import OffloadedWeightsLoader
from torch import nn

import depthprobe
from depthprobe.cli import main
from depthprobe.config import ProbeConfig
from depthprobe.data import Windows
from depthprobe.errors import DepthprobeError
from depthprobe.model.stack import LayerStack
from depthprobe.probes import esd
from depthprobe.probes.weight_spectra import block_modules, find_matrices, spectra_table
from depthprobe.stats import spearman
from tests.tiny_models import build_tiny, random_ids, save_tiny


# ---------------------------------------------------------------------------- naive references
def naive_fit(evals, thresh=1e-5):
    """Clauset et al. (2009) by hand, WW's conventions: every sorted value but the largest as
    xmin, continuous MLE on the tail, KS with the ECDF (j - i)/k, first smallest D."""
    x = sorted(float(v) for v in evals if v > thresh)
    best = None
    for i in range(len(x) - 1):
        tail = x[i:]
        k = len(tail)
        alpha = 1 + k / sum(math.log(v / x[i]) for v in tail)
        d = max(abs(1 - (v / x[i]) ** (1 - alpha) - j / k) for j, v in enumerate(tail)) if alpha > 1 else 1.0
        if best is None or d < best[2]:
            best = (alpha, x[i], d)
    return best


def naive_small_fit(evals, k_min=8):
    """WW's small-sample rule by hand: bias-corrected alpha = 1 + (k-1)/s on tails of >= k_min,
    the first smallest D."""
    x = sorted(float(v) for v in evals if v > 1e-5)
    best = None
    for i in range(len(x) - 1):
        tail = x[i:]
        k = len(tail)
        s = sum(math.log(v / x[i]) for v in tail)
        if k < k_min or s <= 1e-12 or 1 + (k - 1) / s <= 1:
            continue
        alpha = 1 + (k - 1) / s
        d = max(abs(j / k - (1 - (v / x[i]) ** (1 - alpha))) for j, v in enumerate(tail))
        if best is None or d < best[2]:
            best = (alpha, x[i], d)
    return best


def pareto(n, alpha, xmin=1.0, seed=0):
    """n samples of the continuous power law p(x) ~ x^-alpha, x >= xmin (inverse CDF)."""
    u = np.random.default_rng(seed).random(n)
    return xmin * (1 - u) ** (-1 / (alpha - 1))


@pytest.mark.parametrize("n, alpha, seed", [(400, 2.5, 0), (800, 3.5, 1), (60, 4.0, 2)])
def test_power_law_fit_equals_naive_clauset_loop(n, alpha, seed):
    # a power-law tail above a bulk, as an ESD looks: the fit must find it, exactly as by hand
    rng = np.random.default_rng(seed)
    evals = np.concatenate([pareto(n, alpha, 1.0, seed), rng.uniform(0.05, 1.0, n), [1e-7, 3e-6]])
    fit = esd.power_law_fit(evals)
    want_alpha, want_xmin, want_d = naive_fit(evals)
    assert fit.status == "success"
    assert fit.alpha == pytest.approx(want_alpha, rel=1e-10)
    assert fit.xmin == want_xmin and fit.ks_distance == pytest.approx(want_d, rel=1e-10)
    assert fit.num_fitted == len(evals) - 2  # the two values at or below 1e-5 are left out
    assert fit.num_pl_spikes == int((evals >= want_xmin).sum())
    if n >= 400:  # and it recovers the generating exponent
        assert fit.alpha == pytest.approx(alpha, rel=0.1)


def test_small_sample_fit_equals_ww_rule_by_hand():
    evals = pareto(15, 3.0, 0.5, seed=3)
    fit = esd.power_law_fit(evals)
    want_alpha, want_xmin, want_d = naive_small_fit(evals)
    assert fit.alpha == pytest.approx(want_alpha, rel=1e-12) and fit.xmin == want_xmin
    assert fit.ks_distance == pytest.approx(want_d, rel=1e-12)


def test_fit_fails_without_two_values():
    assert esd.power_law_fit(np.array([1e-7, 2.0])).status == "failed"
    assert math.isnan(esd.power_law_fit(np.array([])).alpha)


def test_mle_and_ks_vectors_equal_their_formulas():
    data = np.sort(pareto(50, 3.0, seed=4))
    alphas, ds = esd.mle_alphas(data), esd.ks_distances(data, esd.mle_alphas(data))
    for i in (0, 17, 48):
        k = len(data) - i
        a = 1 + k / np.log(data[i:] / data[i]).sum()
        assert alphas[i] == pytest.approx(a, rel=1e-12)
        assert ds[i] == pytest.approx(np.abs(1 - (data[i:] / data[i]) ** (1 - a) - np.arange(k) / k).max(), rel=1e-12)
    assert (esd.ks_distances(data, alphas, stride=8) <= ds + 1e-15).all()  # a lower bound


# ---------------------------------------------------------------------------- norm metrics vs SVD
def test_table_rows_equal_numpy_svd():
    model = build_tiny("llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2)
    table, _ = spectra_table(model, block_modules(LayerStack.from_model(model)), progress=False)
    modules = dict(model.named_modules())
    for row in table.itertuples():
        sv = np.linalg.svd(modules[row.name].weight.detach().double().numpy(), compute_uv=False)
        lam = sv**2
        assert row.spectral_norm == pytest.approx(lam.max(), rel=1e-10)
        assert row.stable_rank == pytest.approx(lam.sum() / lam.max(), rel=1e-10)
        assert row.sv_max == pytest.approx(sv.max(), rel=1e-10)
        assert row.num_evals == min(modules[row.name].weight.shape)
        naive = naive_fit if (lam > 1e-5).sum() >= 20 else naive_small_fit  # WW's small-sample rule below 20
        assert row.alpha == pytest.approx(naive(lam)[0], rel=1e-9)
        assert row.alpha_weighted == pytest.approx(row.alpha * np.log10(lam.max()), rel=1e-12)
    blocks = table[table.layer.notna()]
    assert set(blocks.layer) == {0, 1} and table.loc[table.name == "model.embed_tokens", "layer"].isna().all()


def test_conv2d_pools_scaled_slices():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 12, 3), nn.Conv2d(12, 5, 2))  # out < in with an even kernel: N, M stay
    table, _ = spectra_table(model, progress=False)
    w = model[0].weight.detach().double().numpy()
    lam = np.concatenate([np.linalg.svd(np.sqrt(0.5) * w[:, :, i, j], compute_uv=False) ** 2
                          for i in range(3) for j in range(3)])
    row = table.iloc[0]
    assert (row.N, row.M, row.rf, row.num_evals) == (12, 6, 9, 54)
    assert row.stable_rank == pytest.approx(lam.sum() / lam.max(), rel=1e-10)
    assert row.alpha == pytest.approx(naive_fit(lam)[0], rel=1e-9)
    assert tuple(table.iloc[1][["N", "M", "rf"]]) == (5, 12, 4)  # WW's per-slice swap, an even number of times


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.small = nn.Linear(4, 6)  # 4 eigenvalues < min_evals 8
        self.ok = nn.Linear(40, 24)
        self.vocab = nn.Embedding(50001, 8)  # N > max_N 50000
        self.norm = nn.LayerNorm(24)
        self.conv = nn.Conv1d(8, 8, 9)  # a 3-D Conv1d kernel: WW cannot take it


def test_ww_layer_rules_and_the_reasons():
    matrices, skipped = find_matrices(Mixed())
    assert [m.name for m in matrices] == ["ok"]
    assert skipped == {
        "fewer than 8 eigenvalues (smaller side x receptive field < 8)": ["small"],
        "a side longer than 50000 (e.g. a large vocabulary's embeddings)": ["vocab"],
        "norm layers (no matrix)": ["norm"], "conv1d weights of 3 dims (WW needs 2, or 4 for Conv2d)": ["conv"]}
    tiny = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(DepthprobeError, match=r"no weight matrix .* qualifies.*1 fewer than 8 eigenvalues .*\(e\.g\. 0\)"):
        spectra_table(tiny, progress=False)


def test_offloaded_weights_are_read_once_and_give_the_same_table(tmp_path, monkeypatch):
    folder = save_tiny("llama", tmp_path / "m", hidden_size=48, intermediate_size=64, num_hidden_layers=3)
    in_memory, _ = depthprobe.load_model(folder, device="cpu", dtype="float32")
    offloaded, _ = depthprobe.load_model(folder, dtype="float32", max_memory="cpu:150KB",
                                         offload_folder=tmp_path / "offload")
    reads: collections.Counter = collections.Counter()
    original = OffloadedWeightsLoader.__getitem__
    monkeypatch.setattr(OffloadedWeightsLoader, "__getitem__", lambda self, k: reads.update([k]) or original(self, k))
    want = spectra_table(in_memory, block_modules(LayerStack.from_model(in_memory)), progress=False)[0]
    got = spectra_table(offloaded, block_modules(LayerStack.from_model(offloaded)), progress=False)[0]
    assert reads and max(reads.values()) == 1
    pd.testing.assert_frame_equal(got, want)


# ---------------------------------------------------------------------------- analyze, CLI, proxies
def test_cli_spectra_is_data_free(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    # a --seq-len no window could have: spectra alone reads no text, so nothing checks it
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(tiny_dir("llama")), "--metrics", "spectra", "--seq-len", "100000", "--device", "cpu",
              "--out", str(out), "-q"])
    assert exc.value.code == 0
    spectra, layers = pd.read_csv(out / "spectra.csv"), pd.read_csv(out / "layers.csv")
    assert list(spectra.columns[:6]) == ["name", "layer", "alpha", "alpha_weighted", "stable_rank", "spectral_norm"]
    means = spectra.dropna(subset=["layer"]).groupby("layer")[["alpha", "stable_rank"]].mean()
    np.testing.assert_allclose(layers["spectra_alpha"], means["alpha"], rtol=1e-8)
    np.testing.assert_allclose(layers["spectra_stable_rank"], means["stable_rank"], rtol=1e-8)
    summary = pd.read_json(out / "summary.json", typ="series")
    assert summary["num_tokens"] == 0 and summary["base_loss"] is None
    assert "Weight spectra per matrix" in (out / "report.html").read_text()


def test_cli_empty_table_is_one_line_exit_2(tmp_path, capsys):
    folder = save_tiny("llama", tmp_path / "m", hidden_size=4, intermediate_size=4, num_attention_heads=1,
                       num_key_value_heads=1, vocab_size=256)
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(folder), "--metrics", "spectra", "--device", "cpu", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1
    assert "no weight matrix" in err[0] and "fewer than 8 eigenvalues" in err[0] and "Traceback" not in err[0]


def test_spectra_beside_pass_metrics_and_in_the_proxy_table():
    model = build_tiny("llama", hidden_size=48, intermediate_size=64, num_hidden_layers=4)
    windows = Windows(random_ids(4, 12), "random ids")
    result = depthprobe.analyze(model, windows=windows, config=ProbeConfig(
        metrics=("angular", "drop", "spectra"), options={"block_sizes": (), "bootstrap_samples": 50}),
        run=depthprobe.RunOptions(progress=False))
    layers, proxies = result.layers, result.tables["proxies"].set_index("proxy")
    assert {"angular_distance", "spectra_alpha", "spectra_stable_rank"} <= set(layers.columns)
    # lower stable rank = matters more: ranked by its negative
    want = spearman(-layers["spectra_stable_rank"], layers["drop_delta_loss"])
    assert proxies.loc["spectra_stable_rank", "spearman"] == pytest.approx(want)
    assert proxies.loc["spectra_spectral_norm", "spearman"] == pytest.approx(
        spearman(layers["spectra_spectral_norm"], layers["drop_delta_loss"]))
    assert proxies.loc["spectra_alpha", "resampled"] == "fixed"


def test_image_classifier_spectra_without_images_and_beside_a_pass(tmp_path, capsys):
    import transformers

    from depthprobe.images import load_images
    from depthprobe.model.vision import VisionStack
    from depthprobe.vision import analyze_images

    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2], layer_type="basic", num_labels=10)).eval()
    model.save_pretrained(tmp_path / "resnet")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:  # data-free: no --images needed
        main(["analyze", str(tmp_path / "resnet"), "--metrics", "spectra", "--out", str(out), "-q"])
    assert exc.value.code == 0
    spectra = pd.read_csv(out / "spectra.csv")
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels * 9 >= 8]
    assert set(convs) <= set(spectra.name) and (spectra.layer_type == "conv2d").sum() == len(convs)
    stack = VisionStack.from_model(model)
    inside = {n for i, b in enumerate(stack.blocks) for n, _ in b.module.named_modules(prefix=b.name)}
    assert spectra.dropna(subset=["layer"]).name.isin(inside).all()
    both = analyze_images(model, load_images("digits", None, 16, 40, 3), metrics="angular,spectra", progress=False)
    assert {"angular_distance", "spectra_alpha"} <= set(both.layers.columns) and "spectra" in both.tables


def test_torch_path_and_parallel_pool_equal_the_serial_cpu_path():
    torch.manual_seed(1)
    w = torch.randn(3, 40, 24)  # batched, as Conv2d slices
    np.testing.assert_allclose(esd._gram_eigenvalues_torch(w, 0.5), esd.gram_eigenvalues(w, 0.5), rtol=1e-10,
                               atol=1e-12)  # the CUDA code, run on CPU tensors
    model = build_tiny("llama", hidden_size=48, intermediate_size=64, num_hidden_layers=2)
    blocks = block_modules(LayerStack.from_model(model))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = spectra_table(model, blocks, progress=False)[0]
        torch.set_num_threads(2)
        parallel = spectra_table(model, blocks, progress=False)[0]
    finally:
        torch.set_num_threads(threads)
    pd.testing.assert_frame_equal(parallel, serial, rtol=1e-10)


def test_parallel_workers_are_capped_by_the_memory_their_gram_matrices_need(monkeypatch):
    from depthprobe.probes import weight_spectra

    model = build_tiny("llama", hidden_size=48, intermediate_size=64, num_hidden_layers=2)
    matrices, _ = find_matrices(model)
    largest = max(2 * m.M * m.M * 8 + esd.GRAM_CHUNK * 8 for m in matrices)  # Gram + LAPACK's copy + a chunk
    assert max(esd.gram_working_bytes(m.M) for m in matrices) == largest
    for room, workers in [(2 * largest - 1, 1), (2 * largest, 1), (6 * largest + 5, 3), (10 ** 15, 10 ** 15 // 2 // largest)]:
        monkeypatch.setattr(weight_spectra, "available_memory", lambda room=room: {"cpu": room})
        assert weight_spectra._workers_that_fit(matrices) == workers
    monkeypatch.setattr(weight_spectra, "available_memory", lambda: {"cpu": largest})  # room for one: serial
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with weight_spectra._pool(matrices) as pool:
            assert isinstance(pool, weight_spectra._Serial)
    finally:
        torch.set_num_threads(threads)


def test_cpu_gram_eigenvalues_equal_numpy_svd_squared_across_row_chunks(monkeypatch):
    monkeypatch.setattr(esd, "GRAM_CHUNK", 7 * 5)  # 5 rows per chunk: 13 rows span three chunks
    torch.manual_seed(3)
    w = torch.randn(13, 7)
    expected = np.sort(np.linalg.svd(w.double().numpy() * 0.5, compute_uv=False) ** 2)
    np.testing.assert_allclose(esd.gram_eigenvalues(w, 0.5), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(esd.gram_eigenvalues(w.T.contiguous(), 0.5), expected, rtol=1e-12, atol=1e-12)


def test_non_finite_weights_are_a_status_not_a_crash():
    layer = nn.Linear(16, 12)
    with torch.no_grad():
        layer.weight[3, 5] = float("nan")
    row = spectra_table(nn.Sequential(layer, nn.Linear(16, 16)), progress=False)[0].iloc[0]
    assert row.status == "non-finite weights" and math.isnan(row.alpha) and math.isnan(row.stable_rank)
