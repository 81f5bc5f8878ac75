"""Reports: findings from hand-made tables, size, escaping, and real rendering in Chromium."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

import depthprobe
from depthprobe.cli import main
from depthprobe.data import Windows
from depthprobe.report import findings, write_report
from depthprobe.results import AnalysisResult
from tests import browser
from tests.tiny_models import random_ids


def synthetic(num_layers=32, name="synthetic", drop=True, seed=0) -> AnalysisResult:
    rng = np.random.default_rng(seed)
    layer = np.arange(num_layers)
    frame = pd.DataFrame({
        "layer": layer,
        "angular_distance": 0.3 * np.exp(-layer / 6) + 0.02 + 0.01 * rng.random(num_layers),
        "block_influence": 0.2 * np.exp(-layer / 6) + 0.01,
        "activation_variance": np.exp(layer / 5),
        "activation_rms": np.exp(layer / 10),
        "max_abs_activation": np.exp(layer / 10) * 10,
        "grad_norm": 1 / (1 + layer),
        "grad_norm_attn": 0.7 / (1 + layer),
        "grad_norm_mlp": 0.7 / (1 + layer),
        "logit_lens_loss": 8 - 5 * (layer + 1) / num_layers,
    })
    tables = {}
    if drop:
        frame["drop_delta_loss"] = 0.5 * np.exp(-layer / 4) + 0.001
        frame["drop_delta_loss_attn"] = frame["drop_delta_loss"] / 3
        frame["drop_delta_loss_mlp"] = frame["drop_delta_loss"] / 2
        tables["block_drop"] = pd.DataFrame({"block_size": 2, "start": layer[:-1], "end": layer[:-1] + 1,
                                             "delta_loss": 0.1 * np.exp(-layer[:-1] / 4),
                                             "angular_distance": 0.2 * np.exp(-layer[:-1] / 6)})
        rows = [("greedy", k, ";".join(map(str, range(num_layers - k, num_layers))), 3.0 + 0.02 * k * k)
                for k in range(0, 9)]
        tables["prune_curve"] = pd.DataFrame(rows, columns=["strategy", "num_removed", "removed", "loss"])
        tables["prune_curve"]["perplexity"] = np.exp(tables["prune_curve"]["loss"])
    angular = pd.DataFrame(
        [[0.05 * n if n <= num_layers - i else np.nan for n in range(1, num_layers + 1)] for i in range(num_layers)],
        columns=range(1, num_layers + 1))
    angular.index.name = "layer"
    summary = {"model": name, "architecture": "LlamaForCausalLM", "num_layers": num_layers, "num_tokens": 1024,
               "base_loss": 3.0, "base_perplexity": float(np.exp(3.0)), "dtype": "float32", "device": "cpu",
               "objective": "lm_loss", "timings_s": {"pass": 1.0}, "versions": {"torch": "x"}, "notes": []}
    return AnalysisResult(frame, summary, angular, tables)


def test_findings_quote_the_numbers():
    result = synthetic(num_layers=12)
    text = " ".join(findings(result))
    drop = result.layers["drop_delta_loss"]
    cheap = int((drop < 0.05).sum())
    assert f"{cheap} of 12 blocks cost less than 0.05 nats" in text
    assert f"most important is layer 0 (+{drop.max():.3f}" in text
    ang = result.layers["angular_distance"]
    assert f"mean angular distance of {ang[6:].mean():.3f}, against {ang[:6].mean():.3f}" in text
    # greedy curve: loss 3 + 0.02 k^2 <= 3 + ln(1.05) = 3.0488 holds up to k = 1
    assert "1 of 12 layers could be removed for at most a 5% perplexity increase" in text
    g = result.layers["grad_norm"]
    assert f"span a factor of {g.max() / g.min():.1f}" in text
    # lens: 8 - 5 (l+1)/12 <= 3.5 first holds at l = 10 and stays
    assert "within 0.5 nats of the final loss (3.000) from layer 10 on" in text


def test_findings_without_drop_make_no_drop_claims():
    text = " ".join(findings(synthetic(num_layers=8, drop=False)))
    assert "dropped" not in text and "removed" not in text


def test_report_size_for_32_layers(tmp_path):
    path = write_report([synthetic(32)], tmp_path / "r.html")
    assert path.stat().st_size < 2_000_000
    html = path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", html)
    assert html.count("<img") >= 7


def test_user_strings_are_escaped(tmp_path):
    result = synthetic(8, name="<script>alert(1)</script>")
    result.summary["notes"] = ["<b>bold</b> & co"]
    html = write_report([result], tmp_path / "r.html").read_text()
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in html
    assert html.count("<script>") == 1  # ours, at the end


def test_report_command_bad_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("Error:") and "not found" in err


def _analyzed(tmp_path, family, tiny_dir, name):
    model, _ = depthprobe.load_model(str(tiny_dir(family)), device="cpu")
    result = depthprobe.analyze(model, windows=Windows(random_ids(4, 16), "r"), metrics="angular,variance,grad,lens,drop",
                                progress=False, model_name=name, options={"block_sizes": [2]})
    folder = tmp_path / name
    result.save(folder)
    return folder


needs_chromium = pytest.mark.skipif(browser.chromium() is None, reason="chromium not installed (make install adds it)")


def _assert_rendered(page, min_figures):
    dom = page["dom"]
    assert 'data-ready="1"' in dom, page["stderr"][-2000:]
    assert "data-js-error" not in dom
    sizes = re.findall(r'data-rendered-width="(\d+)" data-rendered-height="(\d+)" data-natural="(\d+)x(\d+)"', dom)
    assert len(sizes) >= min_figures
    assert all(int(v) > 0 for s in sizes for v in s), sizes
    assert "Uncaught" not in page["stderr"] and "CONSOLE" not in page["stderr"]
    outside = {u for u in page["urls"] if not u.startswith(("file:", "data:", "about:", "chrome:"))}
    assert not outside, outside
    shot = page["screenshot"]
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


@pytest.mark.browser
@needs_chromium
def test_browser_check_detects_outside_requests(tmp_path):
    """The request detector itself works: a page that loads a remote image is caught."""
    page = tmp_path / "leaky.html"
    page.write_text('<html><body><img src="http://example.invalid/pixel.png">x</body></html>')
    assert "http://example.invalid/pixel.png" in browser.render(page, tmp_path)["urls"]


@pytest.mark.browser
@needs_chromium
def test_single_run_renders_in_chromium(tmp_path, tiny_dir):
    folder = _analyzed(tmp_path, "llama", tiny_dir, "tiny-llama")
    html = write_report([folder], tmp_path / "single.html")
    page = browser.render(html, tmp_path)
    _assert_rendered(page, min_figures=7)


@pytest.mark.browser
@needs_chromium
def test_two_runs_side_by_side_render(tmp_path, tiny_dir, capsys):
    a = _analyzed(tmp_path, "llama", tiny_dir, "run-a")
    b = _analyzed(tmp_path, "gpt2", tiny_dir, "run-b<script>")
    with pytest.raises(SystemExit) as exc:
        main(["report", str(a), str(b), "--out", str(tmp_path / "both.html")])
    assert exc.value.code == 0
    page = browser.render(tmp_path / "both.html", tmp_path)
    _assert_rendered(page, min_figures=7)
    assert "run-b&lt;script&gt;" in page["dom"] and 'data-scripts="1"' in page["dom"]
    # one per-layer table holds both runs: 4 rows each, after the "Per-layer table" heading
    table = page["dom"].split("Per-layer table")[1]
    assert table.count("<td>run-a</td>") == 4 and table.count("<td>run-b&lt;script&gt;</td>") == 4


@pytest.mark.browser
@needs_chromium
def test_training_comparison_renders(tmp_path):
    runs = []
    for i, variant in enumerate(["pre", "post", "mix"]):
        result = synthetic(6, name=variant, drop=False, seed=i)
        steps = np.arange(0, 101, 10)
        result.tables["metrics"] = pd.DataFrame({"step": steps, "train_loss": 5 - steps / 50 + 0.1 * i,
                                                 "val_loss": 5.1 - steps / 50 + 0.1 * i})
        result.tables["train_layers"] = pd.DataFrame(
            [(s, layer, 1 / (1 + layer) * (1 + s / 100)) for s in (0, 50, 100) for layer in range(6)],
            columns=["step", "layer", "grad_norm"])
        result.summary["label"] = variant
        runs.append(result)
    html = write_report(runs, tmp_path / "train.html")
    page = browser.render(html, tmp_path)
    _assert_rendered(page, min_figures=9)
