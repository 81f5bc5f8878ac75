"""Speed bench: greedy decode with the KV cache is the model's own greedy generation; tables."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from depthprobe.cli import main
from depthprobe.evaluate.bench import BenchConfig, bench, decode, prefill, speedups
from tests.tiny_models import build_tiny, random_ids


def test_decode_with_cache_is_greedy_generation():
    model = build_tiny("llama").eval()
    ids = random_ids(2, 12)
    cache, first = prefill(model, ids)
    produced = torch.cat([first, decode(model, cache, first, 6)], 1)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=7, min_new_tokens=7, do_sample=False, num_beams=1,
                              attention_mask=torch.ones_like(ids))[:, 12:]
    assert torch.equal(produced, want)


def test_bench_table_and_speedups():
    full = build_tiny("llama").eval()
    half = build_tiny("llama", num_hidden_layers=2).eval()
    config = BenchConfig(batch_sizes=(1, 2), prompt_lens=(8,), new_tokens=3, repeats=2)
    table = bench({"full": full, "half": half}, config, progress=False)
    assert len(table) == 4 and list(table["model"]) == ["full", "half", "full", "half"]
    assert (table["prefill_tokens_per_s"] == table["batch_size"] * 8 / table["prefill_s"]).all()
    assert (table["decode_tokens_per_s"] == table["batch_size"] * 3 / table["decode_s"]).all()
    assert (table["peak_memory_mb"] >= table["weights_mb"]).all()
    n_params = sum(p.numel() for p in half.parameters())
    assert table[table.model == "half"]["weights_mb"].iloc[0] == pytest.approx(n_params * 4 / 2**20)
    speed = speedups(table)
    assert list(speed["model"]) == ["half", "half"]
    full_layers = full.config.num_hidden_layers
    assert (speed["ideal_speedup"] == full_layers / 2).all()
    row = speed.iloc[1]
    t = table.set_index(["model", "batch_size"])
    assert row["decode_speedup"] == pytest.approx(t.loc[("half", 2), "decode_tokens_per_s"]
                                                  / t.loc[("full", 2), "decode_tokens_per_s"])


def test_bench_cli_writes_tables(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    with pytest.raises(SystemExit) as exc:
        main(["bench", str(tiny_dir("llama")), str(tiny_dir("qwen2")), "--batch-sizes", "1", "--prompt-lens", "8",
              "--new-tokens", "2", "--repeats", "1", "--device", "cpu", "--out", str(out), "-q"])
    assert exc.value.code == 0
    table = pd.read_csv(out / "bench.csv")
    assert len(table) == 2 and (out / "bench.png").is_file()
    assert len(pd.read_csv(out / "bench_speedup.csv")) == 1


@pytest.mark.parametrize("args, message", [
    (["--batch-sizes", "0"], "--batch-sizes must be positive"),
    (["--prompt-lens", "a"], "--prompt-lens takes a comma-separated list of integers"),
    (["--new-tokens", "0"], "at least 1"),
])
def test_bench_bad_input_is_one_line(args, message, tiny_dir, capsys):
    model_dir = str(tiny_dir("llama"))
    capsys.readouterr()  # the fixture's own progress bar when it writes the model first
    with pytest.raises(SystemExit) as exc:
        main(["bench", model_dir, *args])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_report_sections_for_heldout_eval_and_bench():
    from depthprobe.report.eval_figures import plot_heldout_curve, sections
    from depthprobe.report.html import figure_html, table_html
    from depthprobe.results import AnalysisResult

    curve = pd.DataFrame({"strategy": ["greedy"] * 3, "num_removed": [0, 1, 2], "removed": ["", "3", "3;1"],
                          "loss": [1.0, 1.2, 1.5], "loss_low": [0.9, 1.1, 1.4], "loss_high": [1.1, 1.3, 1.6],
                          "heldout_loss": [1.1, 1.4, 1.9], "heldout_loss_low": [1.0, 1.3, 1.8],
                          "heldout_loss_high": [1.2, 1.5, 2.0]})
    fig = plot_heldout_curve(curve)
    lines = fig.axes[0].get_lines()
    assert [list(line.get_ydata()) for line in lines] == [[1.0, 1.2, 1.5], [1.1, 1.4, 1.9]]
    run = AnalysisResult.__new__(AnalysisResult)
    run.summary = {"label": "<b>run</b>"}
    run.tables = {"prune_curve": curve,
                  "eval": pd.DataFrame([{"model": "a", "task": "t", "metric": "acc", "value": 0.5, "stderr": 0.1}]),
                  "bench": pd.DataFrame([{"model": "a", "batch_size": 1, "prompt_len": 8,
                                          "prefill_tokens_per_s": 10.0, "decode_tokens_per_s": 5.0}])}
    html = "".join(sections([run], figure_html, table_html))
    assert "Calibration vs held-out loss — &lt;b&gt;run&lt;/b&gt;" in html
    assert "Task scores (lm-eval-harness)" in html and "Speed —" in html and "<b>run</b>" not in html
