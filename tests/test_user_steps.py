"""What a new user hits (issue #18): each test repeats the user's step and checks what they
should see. Fast tests on hand-made runs and tiny random models; real models marked slow."""

from __future__ import annotations

import pandas as pd
import pytest

from depthprobe.cli import main
from depthprobe.errors import DepthprobeError
from depthprobe.report import figures as F
from tests.test_report import synthetic


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def figure_texts(fig) -> str:
    return " ".join(t.get_text() for t in fig.texts)


# --- 1. runs with different metric sets side by side ---------------------------------------

def _without(result, columns):
    result.layers = result.layers.drop(columns=columns)
    return result


def test_report_of_runs_with_different_metrics(tmp_path, capsys):
    full = synthetic(8, name="full")
    drop_only = _without(synthetic(8, name="droponly"), ["logit_lens_loss", "grad_norm", "grad_norm_attn",
                                                          "grad_norm_mlp", "activation_variance"])
    full.save(tmp_path / "full")
    drop_only.save(tmp_path / "droponly")
    code, out, err = run_cli(["report", str(tmp_path / "full"), str(tmp_path / "droponly"),
                              "--out", str(tmp_path / "both.html")], capsys)
    assert code == 0, err
    assert (tmp_path / "both.html").stat().st_size > 10_000

    fig = F.plot_lens([full, drop_only])
    lines = [line for line in fig.axes[0].lines if line.get_linestyle() != "--"]
    assert len(lines) == 1 and list(lines[0].get_ydata()) == list(full.layers["logit_lens_loss"])
    assert "not measured in: droponly" in figure_texts(fig)
    fig = F.plot_grad_norms([full, drop_only])
    assert "not measured in: droponly" in figure_texts(fig)
    fig = F.plot_layers([drop_only, full], ["activation_variance"])
    assert len(fig.axes[0].lines) == 1 and "not measured in: droponly" in figure_texts(fig)
    # both have the metric: nothing to note
    assert figure_texts(F.plot_layers([drop_only, full], ["angular_distance"])) == ""


# --- 5. notebook figures ---------------------------------------------------------------------

@pytest.mark.parametrize("plot", [F.plot_angular_heatmap, F.plot_drop, F.plot_prune_curve, F.plot_lens,
                                  F.plot_grad_norms, F.plot_block_drop])
def test_figures_take_a_single_result(plot):
    result = synthetic(8)
    single, listed = plot(result), plot([result])
    assert single is not None
    # the same picture: same axes, same data in the first axes
    assert len(single.axes) == len(listed.axes)
    first = [tuple(line.get_ydata()) for line in single.axes[0].lines]
    assert first == [tuple(line.get_ydata()) for line in listed.axes[0].lines]


def test_plot_layers_with_a_typo_says_which_columns_exist():
    with pytest.raises(DepthprobeError, match=r"no column 'angular_distanse'.*choose from .*angular_distance"):
        F.plot_layers([synthetic(8)], ["angular_distanse"])
    # a known metric a run did not measure is not a mistake: nothing to draw
    assert F.plot_layers([_without(synthetic(8), ["logit_lens_loss"])], ["logit_lens_loss"]) is None


def test_plot_layers_single_result_draws_the_values():
    result = synthetic(8)
    fig = F.plot_layers(result, ["angular_distance"])
    assert list(fig.axes[0].lines[0].get_ydata()) == list(result.layers["angular_distance"])


# --- 3. one notion of a run folder -------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A train folder, a prune folder and an analyze folder made by the commands, tiny sizes."""
    from tests.tiny_models import save_tiny

    root = tmp_path_factory.mktemp("folders")
    tiny = save_tiny("llama", root / "tiny")
    small = ["--num-sequences", "2", "--seq-len", "16", "--device", "cpu", "-q"]
    for args in (
        ["train", "--norm", "pre", "--preset", "tiny", "--steps", "2", "--max-tokens", "20000", "--val-windows", "2",
         "--batch-size", "2", "--seq-len", "32", "--device", "cpu", "--out", str(root / "train"), "-q"],
        ["prune", str(tiny), "--remove", "1", "--no-curve", "--out", str(root / "prune"), *small],
        ["analyze", str(tiny), "--metrics", "angular,variance", "--out", str(root / "analyze"), *small],
    ):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 0, args
    return root


def test_check_and_load_accept_prune_and_train_folders(folders, capsys):
    from depthprobe.results import AnalysisResult

    for kind in ("train", "prune"):
        loaded = AnalysisResult.load(folders / kind)
        inner = AnalysisResult.load(folders / kind / "analysis")
        pd.testing.assert_frame_equal(loaded.layers, inner.layers)
        code, out, err = run_cli(["check", str(folders / kind), "--baseline", str(folders / kind / "analysis")],
                                 capsys)
        assert code == 0 and out.startswith("OK: "), err
    assert AnalysisResult.load(folders / "prune").num_layers == 3  # the pruned model's own table


def test_analyze_a_train_folder_finds_its_model(folders, capsys):
    import depthprobe

    code, out, err = run_cli(["analyze", str(folders / "train"), "--metrics", "angular", "--num-sequences", "2",
                              "--seq-len", "16", "--device", "cpu", "-q", "--out", str(folders / "re")], capsys)
    assert code == 0, err
    model, tok = depthprobe.load_model(str(folders / "train" / "model"), device="cpu")
    direct = depthprobe.analyze(model, tok, metrics="angular", num_sequences=2, seq_len=16, progress=False)
    again = pd.read_csv(folders / "re" / "layers.csv")
    assert list(again["angular_distance"]) == pytest.approx(list(direct.layers["angular_distance"]), rel=1e-6)


@pytest.mark.parametrize("kind, message", [
    ("analyze", "holds analysis results, not a model; analyze the model it measured"),
])
def test_analyze_a_folder_without_a_model_says_so(folders, capsys, kind, message):
    code, _, err = run_cli(["analyze", str(folders / kind), "--num-sequences", "2", "--seq-len", "16"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_folder_that_is_no_run_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["check", str(tmp_path / "empty"), "--baseline", str(tmp_path / "empty")], capsys)
    assert code == 2 and "not a depthprobe run folder" in err


# --- 2. a prune folder's report describes the pruned model ------------------------------------

def test_prune_report_leads_with_what_was_removed(folders, capsys):
    import json

    import depthprobe
    from depthprobe.data import make_windows

    code, _, err = run_cli(["prune", str(folders / "tiny"), "--num-layers", "2", "--strategy", "greedy",
                            "--num-sequences", "2", "--seq-len", "16", "--device", "cpu", "-q",
                            "--out", str(folders / "greedy")], capsys)
    assert code == 0, err
    out = folders / "greedy"
    p = json.loads((out / "prune.json").read_text())
    own = json.loads((out / "analysis" / "summary.json").read_text())
    assert own["num_layers"] == 2 and json.loads((out / "original" / "summary.json").read_text())["num_layers"] == 4
    assert own["base_loss"] == pytest.approx(p["loss_after"], rel=1e-5)
    # the pruned model's own angular distances: the exported folder analyzed on the same windows
    model, tok = depthprobe.load_model(str(out), device="cpu")
    windows = make_windows(tok, num_sequences=2, seq_len=16)
    direct = depthprobe.analyze(model, windows=windows, metrics="angular", progress=False)
    saved = pd.read_csv(out / "analysis" / "layers.csv")
    assert list(saved["angular_distance"]) == pytest.approx(list(direct.layers["angular_distance"]), rel=1e-5)

    page = (out / "report.html").read_text()
    removed = ", ".join(map(str, p["removed"]))
    lead = (f"Removed 2 of 4 blocks ({removed}; strategy greedy): 4 → 2 blocks.")
    assert lead in page and page.index(lead) < page.index("Findings")
    assert f"Calibration loss {p['loss_before']:.4f} → {p['loss_after']:.4f}" in page
    assert "<tr><td>blocks</td><td>2</td>" in page


def test_prune_lead_quotes_heldout_when_measured():
    from depthprobe.report.prune_summary import prune_sentences

    result = synthetic(6)
    result.summary["prune"] = {"removed": [3, 4], "num_removed": 2, "num_layers_before": 8, "num_layers_after": 6,
                               "strategy": "drop", "objective": "lm_loss", "loss_before": 3.0, "loss_after": 3.5,
                               "perplexity_before": 20.0855, "perplexity_after": 33.1155,
                               "heldout_loss_before": 3.2, "heldout_loss_after": 3.9,
                               "heldout_perplexity_before": 24.5325, "heldout_perplexity_after": 49.402}
    text = " ".join(prune_sentences(result))
    assert "Removed 2 of 8 blocks (3, 4; strategy drop): 8 → 6 blocks." in text
    assert "Calibration loss 3.0000 → 3.5000 (perplexity 20.09 → 33.12, +64.9%)" in text
    assert "Held-out loss 3.2000 → 3.9000 (perplexity 24.53 → 49.40, +101.4%)" in text
    del result.summary["prune"]["heldout_loss_after"]
    assert "No held-out loss was measured" in " ".join(prune_sentences(result))
    assert prune_sentences(synthetic(6)) == []


# --- 4. check blames the setup before the model -----------------------------------------------

@pytest.fixture(scope="module")
def two_texts(tmp_path_factory, folders):
    """The same tiny model analyzed on two different texts with equal token counts."""
    import depthprobe
    from depthprobe.data import builtin_text

    root = tmp_path_factory.mktemp("texts")
    text = builtin_text()
    runs = {}
    for name, part in (("a", text[:20_000]), ("b", text[40_000:60_000])):
        (root / f"{name}.txt").write_text(part)
        model, tok = depthprobe.load_model(str(folders / "tiny"), device="cpu")
        result = depthprobe.analyze(model, tok, metrics="angular,variance", num_sequences=2, seq_len=16,
                                    text_file=root / f"{name}.txt", progress=False)
        runs[name] = result.save(root / name)
    return runs


def test_check_reports_a_different_text_first(two_texts, capsys):
    a, b = two_texts["a"], two_texts["b"]
    code, out, err = run_cli(["check", str(a), "--baseline", str(b)], capsys)
    assert code == 2 and out == ""
    assert "measured differently (calibration text" in err and "--allow-different-text" in err
    assert len(err.strip().splitlines()) == 1
    code, out, err = run_cli(["check", str(a), "--baseline", str(b), "--allow-different-text"], capsys)
    assert code == 1 and out.startswith("note: measured differently: calibration text")  # values did move


def test_check_reports_a_different_dtype_and_windows(two_texts, tmp_path, capsys):
    from depthprobe.results import AnalysisResult

    other = AnalysisResult.load(two_texts["a"])
    other.summary["dtype"], other.summary["num_sequences"] = "float64", 4
    other.save(tmp_path / "other")
    code, _, err = run_cli(["check", str(tmp_path / "other"), "--baseline", str(two_texts["a"])], capsys)
    assert code == 2 and "windows 4 in the run vs 2 in the baseline" in err
    assert "dtype 'float64' in the run vs 'float32' in the baseline" in err


# --- 5. smaller stumbles -----------------------------------------------------------------------

def test_analyze_without_out_says_nothing_was_saved(folders, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for quiet in ([], ["-q"]):
        code, out, err = run_cli(["analyze", str(folders / "tiny"), "--metrics", "angular", "--num-sequences", "2",
                                  "--seq-len", "16", "--device", "cpu", *quiet], capsys)
        assert code == 0 and "Nothing saved: add --out DIR" in err
        assert ("angular_distance" in out) == (not quiet)
    assert list(tmp_path.iterdir()) == []


def _interrupt_drop_after(monkeypatch, calls_before_interrupt: int):
    from depthprobe.prune import sweep

    calls = {"n": 0}
    real_run = sweep.BatchScorer.run

    def flaky_run(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > calls_before_interrupt:
            raise KeyboardInterrupt
        return real_run(self, *a, **k)

    monkeypatch.setattr(sweep.BatchScorer, "run", flaky_run)


@pytest.mark.parametrize("metrics", ["drop", "angular,drop"])
def test_interrupt_before_the_first_drop_batch(folders, tmp_path, capsys, monkeypatch, metrics):
    _interrupt_drop_after(monkeypatch, 0)
    out = tmp_path / "run"
    code, _, err = run_cli(["analyze", str(folders / "tiny"), "--metrics", metrics, "--num-sequences", "4",
                            "--batch-size", "2", "--seq-len", "16", "--device", "cpu", "-q", "--out", str(out)], capsys)
    assert code == 2 and "--resume" not in err
    if metrics == "drop":  # nothing measured: no layer-only table, no empty report
        assert "before any metric finished; nothing was saved" in err
        assert not (out / "layers.csv").exists() and not (out / "report.html").exists()
    else:
        assert pd.read_csv(out / "layers.csv").columns.tolist() == ["layer", "angular_distance", "block_influence",
                                                               "angular_distance_mid", "block_influence_mid"]


def test_interrupt_after_a_drop_batch_offers_resume(folders, tmp_path, capsys, monkeypatch):
    per_batch = 4 * 3  # 4 blocks: block, attention and MLP drops (--block-sizes '')
    _interrupt_drop_after(monkeypatch, per_batch + 1)
    out = tmp_path / "run"
    code, _, err = run_cli(["analyze", str(folders / "tiny"), "--metrics", "angular,drop", "--block-sizes", "",
                            "--num-sequences", "4", "--batch-size", "2", "--seq-len", "16", "--device", "cpu", "-q",
                            "--out", str(out)], capsys)
    command = (f"depthprobe analyze {folders / 'tiny'} --metrics angular,drop --block-sizes '' --num-sequences 4 "
               f"--batch-size 2 --seq-len 16 --device cpu -q --out {out} --resume")
    assert code == 2 and [line for line in err.splitlines() if line.startswith("Error:")] == [
        "Error: interrupted during the drop sweep; the main pass (angular_distance, block_influence, "
        f"angular_distance_mid, block_influence_mid) finished and is saved in {out}/, with 1 finished drop batch(es) in drop_progress.jsonl; continue with: {command}"]
    assert len((out / "drop_progress.jsonl").read_text().splitlines()) == 2  # header + one batch


@pytest.mark.parametrize("command", ["prune", "train"])
def test_train_and_prune_keep_an_existing_out(folders, tmp_path, capsys, command):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    args = (["prune", str(folders / "tiny"), "--remove", "1", "--no-curve", "--num-sequences", "2", "--seq-len", "16",
             "--device", "cpu", "-q", "--no-report"] if command == "prune" else
            ["train", "--preset", "tiny", "--steps", "1", "--max-tokens", "20000", "--val-windows", "2",
             "--batch-size", "2", "--seq-len", "32", "--device", "cpu", "-q", "--no-report"])
    code, _, err = run_cli([*args, "--out", str(out)], capsys)
    assert code == 2 and f"--out {out} exists and is not empty" in err
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    code, _, err = run_cli([*args, "--out", str(out), "--force"], capsys)
    assert code == 0, err
    assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) > 1


def test_verbose_logs_depthprobes_own_steps(folders, tmp_path, capsys, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="depthprobe")
    code, _, _ = run_cli(["analyze", str(folders / "tiny"), "--metrics", "angular", "--num-sequences", "2",
                          "--seq-len", "16", "--device", "cpu", "-q", "-v", "--out", str(tmp_path / "v")], capsys)
    assert code == 0
    messages = [(r.name, r.getMessage()) for r in caplog.records if r.name.startswith("depthprobe")]
    assert ("depthprobe.model.load", f"loading {folders / 'tiny'} as torch.float32") in messages
    assert any(name == "depthprobe.analysis" and "2 windows x 16 tokens" in m for name, m in messages)


def test_unknown_command_suggests_the_closest(capsys):
    code, _, err = run_cli(["analyse", "smollm2"], capsys)
    assert code == 2 and "no command 'analyse'; did you mean `depthprobe analyze`?" in err
    code, _, err = run_cli(["frobnicate"], capsys)
    assert code == 2 and "commands: analyze, prune" in err


def test_dir_and_reprs_are_short(folders):
    import depthprobe
    from tests.tiny_models import build_tiny

    depthprobe.analyze  # noqa: B018 - imported on first use, then also a global
    names = dir(depthprobe)
    assert len(names) == len(set(names)) and {"analyze", "LayerStack", "AnalysisResult"} <= set(names)
    stack = depthprobe.LayerStack.from_model(build_tiny("llama"))
    assert repr(stack) == ("LayerStack(LlamaForCausalLM, family='llama', blocks=4 at 'model.layers', head=yes)")


@pytest.mark.slow
def test_packaged_model_is_named_by_its_alias(smollm2):
    import depthprobe

    model, tok = smollm2
    result = depthprobe.analyze(model, tok, metrics="angular", num_sequences=1, seq_len=16, progress=False)
    assert result.summary["model"] == "smollm2"


def test_notebook_shows_the_table_and_the_main_figures():
    import base64
    import re

    result = synthetic(8, name="nb <model>")
    page = result._repr_html_()
    assert "nb &lt;model&gt;" in page and "<model>" not in page  # escaped
    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [alt for alt, _ in images] == ["How much each block changes the stream", "Activation scale (log)",
                                          "Gradient norms (log)", "Logit lens", "What dropping each block costs"]
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for _, data in images)
    # self-contained: no script, no link, every src a data URI, no URL at all
    assert "<script" not in page and "<link" not in page and "http" not in page
    assert re.findall(r'src="([^":]*):', page) == ["data"] * len(images)
    # the per-layer table: every layer with its angular distance as table_html formats it
    rows = re.findall(r"<tr><td>(\d+)</td><td>([^<]*)</td>", page)
    assert [int(layer) for layer, _ in rows] == list(range(8))
    assert [float(v) for _, v in rows] == pytest.approx(list(result.layers["angular_distance"]), rel=1e-4)
    assert "Findings" not in page and "most important is layer 0" in page


# --- 5. captions that match the figures; comparison report ------------------------------------

def _captions(page: str) -> dict[str, str]:
    import re

    return dict(re.findall(r'<img alt="([^"]*)"[^>]*><figcaption>([^<]*)</figcaption>', page))


def test_captions_describe_what_is_drawn(tmp_path):
    import html

    from depthprobe.report import write_report

    encoder = _without(synthetic(6, name="enc"), ["drop_delta_loss_attn", "drop_delta_loss_mlp", "grad_norm",
                                                     "grad_norm_attn", "grad_norm_mlp"])
    encoder.summary.update(norm_placement="post", objective="cosine_drift", base_loss=None, base_perplexity=None)
    caps = {k: html.unescape(v) for k, v in _captions(write_report([encoder], tmp_path / "e.html").read_text()).items()}
    assert "Pre-LN" not in caps["Activation scale"] and "Post-LN" in caps["Activation scale"]
    assert "dashed" not in caps["Logit lens"] and "cosine drift" in caps["Logit lens"]
    assert "attention" not in caps["What dropping each block costs"] and "MLP" not in caps["What dropping each block costs"]
    fig = F.plot_lens(encoder)  # and indeed no dashed line is drawn
    assert [line.get_linestyle() for line in fig.axes[0].lines] == ["-"]

    decoder = synthetic(6)
    decoder.summary["norm_placement"] = "pre"
    caps = {k: html.unescape(v) for k, v in _captions(write_report([decoder], tmp_path / "d.html").read_text()).items()}
    assert "Pre-LN" in caps["Activation scale"] and "dashed line" in caps["Logit lens"]
    assert "only its attention (yellow) or only its MLP (green)" in caps["What dropping each block costs"]
    assert len(F.plot_drop(decoder).axes[0].containers) == 3  # three bar groups, as the caption says


def test_small_models_get_integer_layer_ticks():
    result = synthetic(4)
    for fig in (F.plot_layers(result, ["angular_distance"]), F.plot_lens(result), F.plot_drop(result),
                F.plot_angular_heatmap(result), F.plot_prune_curve(result)):
        fig.canvas.draw()
        ticks = fig.axes[0].get_xticks()
        assert len(ticks) and all(float(t).is_integer() for t in ticks)


def test_comparison_report_leads_with_its_result_and_legend_is_outside(tmp_path):
    from depthprobe.report import write_report

    runs = [synthetic(6, name=v, seed=i) for i, v in enumerate(["pre", "post", "mix", "peri", "lns"])]
    runs[0].tables["comparison"] = pd.DataFrame({"variant": ["pre", "post"], "val_loss_mean": [3.1, 3.3]})
    page = write_report(runs, tmp_path / "cmp.html").read_text()
    assert page.index("Comparison across seeds") < page.index("Findings") < page.index("How much each block")

    fig = F.plot_grad_norms(runs)
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["pre", "post", "mix", "peri", "lns", "grad norm (block)",
                                                         "grad norm (attention)", "grad norm (MLP)"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert legend.get_window_extent(renderer).x0 >= fig.axes[0].get_window_extent(renderer).x1  # beside, not over


# --- 5. statistics from too little data carry a warning ----------------------------------------

def test_bootstrap_over_two_windows_is_flagged(folders, tmp_path, capsys):
    code, out, _ = run_cli(["analyze", str(folders / "tiny"), "--metrics", "angular,drop", "--block-sizes", "",
                            "--num-sequences", "2", "--seq-len", "16", "--device", "cpu", "--out", str(tmp_path / "r")],
                           capsys)
    assert code == 0
    warning = "bootstrapped over only 2 windows (fewer than 8)"
    assert warning in out  # printed with the table and the verdict
    page = (tmp_path / "r" / "report.html").read_text()
    assert warning in page and page.index(warning) < page.index("Which proxy predicts")


def test_caveats_from_the_summary():
    from depthprobe.caveats import caveats

    boot = {"resamples": 1000}
    assert caveats({"num_sequences": 8, "bootstrap": boot}) == []
    assert caveats({"num_sequences": 2}) == []  # no bootstrap ran: nothing to warn about
    assert "over only 7 windows" in caveats({"num_sequences": 7, "bootstrap": boot})[0]
    assert caveats({"attribution_convergence_delta": 0.05}) == []
    (text,) = caveats({"attribution_convergence_delta": 16.7})
    assert "relative convergence delta 16.7 > 0.1" in text and "--attribution-steps" in text
