"""Issue 25: fail in seconds, never mix two runs, say what was kept.

The tests drive the CLI as a user does (a subprocess, typed arguments, SIGINT / SIGTERM) on a
tiny model; each checks the outcome against values computed independently.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import depthprobe

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--num-sequences", "2", "--seq-len", "16", "--device", "cpu"]


def run(args, env=None, timeout=600):
    """``depthprobe ARGS`` in a fresh process: (exit code, stdout, stderr)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    proc = subprocess.run([sys.executable, "-m", "depthprobe", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("Error:")]


def loaded_weights(err: str) -> bool:
    """``-v`` logs ``loading <source> as <dtype>`` just before the weights are read."""
    return any("depthprobe.model.load: loading" in line for line in err.splitlines())


# ---------------------------------------------------------------- 1, 7: checks before weights
def test_repair_budget_fails_before_any_weight_and_names_enough_windows(tiny_dir, tmp_path):
    folder = tiny_dir("llama")  # hidden size 32: a 32x32 map needs 32 fit tokens
    code, _, err = run(["prune", folder, "--num-layers", "1", "--strategy", "block", "--repair", "linear",
                        "--num-sequences", "2", "--seq-len", "8", "--heldout-windows", "2", "--repair-windows", "4",
                        "--device", "cpu", "--out", tmp_path / "p", "-v"])
    assert code == 2 and "Traceback" not in err and not loaded_weights(err)
    (line,) = error_lines(err)
    suggested = int(line.split("--repair-windows ")[1].split()[0])
    # the suggestion is what repair itself accepts, and one window fewer is what it refuses
    from depthprobe.prune.repair import repair_linear

    model, _ = depthprobe.load_model(str(folder), device="cpu")
    ids = torch.randint(2, 100, (suggested, 8))
    repair_linear(model, [1], ids)
    with pytest.raises(depthprobe.DepthprobeError, match="needs at least 32"):
        repair_linear(model, [1], ids[: suggested - 1])
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())


@pytest.mark.parametrize("case", ["metric-typo", "seq-len-0", "missing-text", "empty-text"])
def test_cheap_mistakes_fail_before_the_model_loads(tiny_dir, tmp_path, case):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    extra = {"metric-typo": ["--metrics", "angluar"], "seq-len-0": ["--seq-len", "0"],
             "missing-text": ["--text-file", tmp_path / "nope.txt"], "empty-text": ["--text-file", empty]}[case]
    code, _, err = run(["analyze", tiny_dir("llama"), "--device", "cpu", *extra, "-v"])
    assert code == 2 and "Traceback" not in err and not loaded_weights(err)
    (line,) = error_lines(err)
    want = {"metric-typo": "did you mean 'angular'", "seq-len-0": "--seq-len must be at least 2 (got 0)",
            "missing-text": "file not found", "empty-text": "is empty"}[case]
    assert want in line


def test_an_unreachable_hub_fails_in_one_line_without_retries(tmp_path):
    # a closed local port: the hub "exists" but nothing answers; an empty cache
    env = {"HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None, "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HOME": str(tmp_path / "hf")}
    code, out, err = run(["analyze", "someone/some-model", "--device", "cpu"], env=env)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == error_lines(err) and len(error_lines(err)) == 1
    assert "cannot be reached" in err and "offline alternatives" in err and "smollm2" in err
    assert "retry" not in (out + err).lower()


# ---------------------------------------------------------------- 3: one run per folder
def test_analyze_refuses_a_used_out_and_force_replaces_the_run(tiny_dir, tmp_path):
    folder, out = tiny_dir("llama"), tmp_path / "run"
    code, _, err = run(["analyze", folder, *FAST, "--metrics", "angular,drop", "--block-sizes", "2", "--out", out,
                        "-q", "--no-report"])
    assert code == 0, err
    drop_tables = {p.name for p in out.glob("*.csv")} - {"layers.csv", "angular_distance.csv"}
    assert drop_tables  # the drop run wrote tables of its own
    code, _, err = run(["analyze", folder, *FAST, "--metrics", "angular", "--out", out, "-q", "--no-report"])
    assert code == 2 and "--force" in error_lines(err)[0]
    (out / "notes.txt").write_text("mine")  # not the run's: kept
    code, _, err = run(["analyze", folder, *FAST, "--metrics", "angular", "--out", out, "-q", "--no-report",
                        "--force"])
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted([*summary["files"], "notes.txt"])
    assert not any((out / name).exists() for name in drop_tables)
    (out / "drop_windows.csv").write_text("layer,delta\n0,1\n")  # a leftover of another run
    result = depthprobe.AnalysisResult.load(out)
    assert result.tables == {} and list(result.layers.columns) == ["layer", "angular_distance", "block_influence",
                                                                   "angular_distance_mid", "block_influence_mid"]


# ---------------------------------------------------------------- 6: interrupts
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_drop_sweep_says_what_is_kept_and_its_command_continues(tiny_dir, tmp_path, sig):
    folder, out = tiny_dir("llama"), tmp_path / "run"
    args = ["analyze", str(folder), "--metrics", "drop", "--block-sizes", "2", "--num-sequences", "48",
            "--batch-size", "1", "--seq-len", "16", "--device", "cpu", "--out", str(out), "-q", "--no-report"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "depthprobe", *args], stderr=subprocess.PIPE, text=True, env=env)
    progress = out / "drop_progress.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if progress.is_file() and len(progress.read_text().splitlines()) >= 3:  # header + 2 batches
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in err
    (line,) = error_lines(err)
    batches = len(progress.read_text().splitlines()) - 1
    assert f"{batches} finished drop batch(es) in drop_progress.jsonl" in line
    command = line.split("continue with: ")[1]
    assert command == "depthprobe " + shlex.join([*args, "--resume"])
    code, _, err = run(shlex.split(command)[1:])
    assert code == 0, err
    straight = tmp_path / "straight"
    code, _, err = run([*args[:-4], "--out", straight, "-q", "--no-report"])
    assert code == 0, err
    pd.testing.assert_frame_equal(pd.read_csv(out / "layers.csv"), pd.read_csv(straight / "layers.csv"))


# ---------------------------------------------------------------- 2: prune's judge
PRUNE = ["--remove", "1", "--no-curve", "--heldout-windows", "2", *FAST]
BENCH = ["--bench", "--bench-batch-sizes", "1", "--bench-prompt-lens", "8", "--bench-new-tokens", "2",
         "--bench-repeats", "1"]


def test_prune_bench_takes_size_options_and_resume_refuses_other_options(tiny_dir, tmp_path):
    folder, out = tiny_dir("llama"), tmp_path / "pruned"
    code, _, err = run(["prune", folder, *PRUNE, *BENCH, "--out", out, "--no-report", "-q"])
    assert code == 0, err
    bench = pd.read_csv(out / "bench.csv")
    assert bench[["model", "num_layers", "batch_size", "prompt_len", "new_tokens"]].values.tolist() == [
        ["original", 4, 1, 8, 2], ["pruned", 3, 1, 8, 2]]
    assert not (out / "judge_progress.jsonl").exists()  # written: nothing left to resume
    code, _, err = run(["prune", folder, *PRUNE[:-6], "--num-sequences", "2", "--seq-len", "32", "--device", "cpu",
                        *BENCH, "--out", out, "--resume", "-q"])
    assert code == 2
    (line,) = error_lines(err)
    assert "--seq-len 32 (was 16)" in line and "num-sequences" not in line


def test_prune_judge_reads_finished_measurements_back_on_resume(tiny_dir, tmp_path, monkeypatch):
    from depthprobe.cli.evaluate_options import JUDGE_JOURNAL, PruneJudge
    from depthprobe.evaluate import bench as bench_module

    model, tok = depthprobe.load_model(str(tiny_dir("llama")), device="cpu")
    opts = {"out_dir": str(tmp_path), "resume": False, "eval_tasks": None, "run_bench": True, "quiet": True,
            "bench_batch_sizes": "1", "bench_prompt_lens": "8", "bench_new_tokens": 2, "bench_repeats": 1}
    first = PruneJudge(opts, fingerprint="run-a")
    first.measure("original", model, tok)
    assert (tmp_path / JUDGE_JOURNAL).is_file()

    def no_bench(*a, **k):
        raise AssertionError("the original model was measured again")

    monkeypatch.setattr(bench_module, "bench", no_bench)
    again = PruneJudge({**opts, "resume": True}, fingerprint="run-a")
    again.measure("original", model, tok)
    pd.testing.assert_frame_equal(again.bench_rows[0], first.bench_rows[0].reset_index(drop=True),
                                  check_dtype=False)
    with pytest.raises(depthprobe.DepthprobeError, match="different prune evaluation"):
        PruneJudge({**opts, "resume": True}, fingerprint="run-b")


# ---------------------------------------------------------------- 5: side-by-side alignment
def test_report_aligns_a_pruned_run_on_original_blocks(tiny_dir, tmp_path):
    from depthprobe.report.align import aligned, kept_blocks, original_indices
    from depthprobe.report.html import render

    folder = tiny_dir("llama")
    assert run(["analyze", folder, *FAST, "--metrics", "angular,variance", "--out", tmp_path / "a", "-q",
                "--no-report"])[0] == 0
    assert run(["prune", folder, *PRUNE, "--out", tmp_path / "p", "--no-report", "-q"])[0] == 0
    original = depthprobe.AnalysisResult.load(tmp_path / "a")
    pruned = depthprobe.AnalysisResult.load(tmp_path / "p")
    assert kept_blocks(pruned) == [0, 2, 3]
    shown = aligned(pruned).layers
    assert shown["layer"].tolist() == [0, 1, 2, 3] and shown.loc[1].drop("layer").isna().all()
    for new, old in enumerate([0, 2, 3]):  # kept blocks carry their own values at their original index
        assert shown.loc[old, "angular_distance"] == pruned.layers.loc[new, "angular_distance"]
        assert shown.loc[old, "pruned_layer"] == new
    assert original_indices("the smallest change is at layer 1 (0.1); layers 1–2 each", [0, 2, 3]) == (
        "the smallest change is at layer 2 [1] (0.1); layers 2–3 [1–2] each")
    assert "pruned_layer" in render([original, pruned])
    # findings of a pruned run beside others quote original indices, the pruned one in brackets
    from depthprobe.report.html import _findings_as_shown

    five = depthprobe.AnalysisResult(
        layers=pd.DataFrame({"layer": range(5), "angular_distance": [0.5, 0.4, 0.1, 0.3, 0.2]}),
        summary={"model": "m", "pruned_from": {"model": "m", "removed": [1], "num_layers": 6}})
    sentence = next(s for s in _findings_as_shown(five) if "smallest change" in s)
    assert "at layer 3 [2] (0.100)" in sentence and "largest at layer 0 [0]" in sentence


# ---------------------------------------------------------------- 8, 9, 10: small things
def test_no_vacuous_logit_lens_finding():
    from depthprobe.report.findings import findings

    layers = pd.DataFrame({"layer": range(4), "logit_lens_loss": [9.0, 8.0, 7.0, 3.0]})
    result = depthprobe.AnalysisResult(layers=layers, summary={"base_loss": 3.0})
    assert not any("within 0.5 nats" in s for s in findings(result))  # only the last block: always true
    layers["logit_lens_loss"] = [9.0, 8.0, 3.2, 3.0]
    assert any("from layer 2 on" in s for s in findings(result))


def test_bench_cpu_peak_is_sampled_above_the_weights_and_warns_nothing():
    import warnings

    from depthprobe.evaluate.bench import BenchConfig, bench, weights_mb
    from tests.tiny_models import build_tiny

    model = build_tiny("llama").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        table = bench({"m": model}, BenchConfig(batch_sizes=(8,), prompt_lens=(96,), new_tokens=2, repeats=1),
                      progress=False)
    # logits alone: 8 x 96 positions x 128 vocab x 4 bytes, far above page noise
    logits_mb = 8 * 96 * 128 * 4 / 2**20
    assert table["peak_memory_mb"].iloc[0] >= weights_mb(model) + 0.5 * logits_mb


def test_heatmaps_of_compared_runs_share_one_colour_scale():
    from depthprobe.report.figures import plot_angular_heatmap

    runs = []
    for scale in (1.0, 40.0):
        frame = pd.DataFrame(np.full((3, 3), 0.01 * scale), index=range(3), columns=[1, 2, 3])
        runs.append(depthprobe.AnalysisResult(layers=pd.DataFrame({"layer": range(3)}), summary={"model": str(scale)},
                                              angular_distance=frame))
    fig = plot_angular_heatmap(runs)
    limits = {ax.images[0].get_clim() for ax in fig.axes if ax.images}
    assert limits == {(0.01, 0.4)}


def test_exported_files_are_as_readable_as_other_outputs(tiny_dir, tmp_path):
    out = tmp_path / "p"
    assert run(["prune", tiny_dir("llama"), *PRUNE, "--out", out, "--no-report", "-q"])[0] == 0
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert modes["model.safetensors"] == 0o666 & ~mask and set(modes.values()) == {0o666 & ~mask}


def test_held_out_line_uses_four_decimals():
    from depthprobe.cli.evaluate_options import heldout_line

    line = heldout_line({"heldout_loss_full": 3.123456, "heldout_loss_removed": 3.5, "heldout_source": "x",
                         "heldout_loss_repaired": 3.3, "repair_recovered": 0.5, "heldout_loss_healed": 3.2123456,
                         "heal_recovered": 0.75, "heldout_loss_final": 3.2123456})
    assert "healed 3.2123 (" in line and "repaired 3.3000 (" in line and "3.123456" not in line


# ---------------------------------------------------------------- 8 (help): no heavy import
def test_every_command_help_imports_neither_torch_nor_pandas():
    code = ("import sys; from depthprobe.cli import COMMANDS; import importlib\n"
            "for m in COMMANDS.values(): importlib.import_module('depthprobe.cli.' + m)\n"
            "print(sorted(k for k in ('torch', 'transformers', 'pandas', 'peft') if k in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_cli_choices_equal_their_homes():
    from depthprobe import analysis
    from depthprobe.cli import choices
    from depthprobe.convert.fold import KINDS
    from depthprobe.evaluate.cloze import TASK_NAME
    from depthprobe.model.load import DEVICE_MAPS, DTYPES
    from depthprobe.probes import sweep
    from depthprobe.prune.repair import RepairConfig
    from depthprobe.prune.select import STRATEGIES
    from depthprobe.testing import compare
    from depthprobe.train import model as train_model

    assert choices.DTYPE_NAMES == tuple(DTYPES) and choices.DEVICE_MAPS == DEVICE_MAPS
    assert choices.ALL_METRICS == analysis.ALL_METRICS and choices.DEFAULT_METRICS == analysis.DEFAULT_METRICS
    assert choices.DEFAULT_BLOCK_SIZES == sweep.DEFAULT_BLOCK_SIZES
    assert choices.DEFAULT_ATTRIBUTION_STEPS == sweep.DEFAULT_ATTRIBUTION_STEPS
    assert choices.EXECUTION_ORDERS == sweep.EXECUTION_ORDERS and choices.STRATEGIES == STRATEGIES
    assert choices.CONVERT_KINDS == KINDS and choices.CLOZE_TASK == TASK_NAME
    assert choices.PLACEMENT_NAMES == train_model.PLACEMENT_NAMES and choices.NORM_TYPES == train_model.NORM_TYPES
    assert choices.PRESET_NAMES == tuple(train_model.PRESETS)
    assert (choices.DEFAULT_RTOL, choices.DEFAULT_ATOL) == (compare.DEFAULT_RTOL, compare.DEFAULT_ATOL)
    assert choices.REPAIR_VAL_FRACTION == RepairConfig().val_fraction


# ---------------------------------------------------------------- 12: architectures
def test_bert_lm_head_built_as_an_encoder_is_scored_as_an_lm():
    from tests import arch_coverage as cov

    model = cov.build_tiny("bert")  # as its config ships: is_decoder False
    assert model.config.is_decoder is False
    windows = cov.calibration_windows()
    result = depthprobe.analyze(model, windows=windows, metrics="angular,variance,grad,drop", progress=False,
                                batch_size=windows.num_sequences, options={"block_sizes": ()})
    assert all(np.isfinite(result.layers[c]).all() for c in cov.BLOCK_METRICS)
    ids = windows.input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert result.summary["base_loss"] == pytest.approx(float(want), rel=1e-5)


def test_parallel_block_lists_are_refused_in_one_line(tmp_path):
    from tests import arch_coverage as cov

    model = cov.build_tiny("xlm")
    folder = tmp_path / "xlm"
    model.save_pretrained(folder)
    cov.tokenizer().save_pretrained(folder)
    code, _, err = run(["analyze", folder, "--metrics", "angular,drop", *FAST])
    assert code == 2 and "Traceback" not in err
    (line,) = error_lines(err)
    assert "parallel lists" in line and "not supported" in line


# ---------------------------------------------------------------- README walkthrough
@pytest.mark.slow
def test_readme_prune_with_eval_and_bench_runs_in_three_minutes(tmp_path):
    """The README's prune-with-eval-and-bench example on the real SmolLM2, at small windows and
    the bench settings it writes: done (exit 0, eval and bench tables) within 3 minutes."""
    from tests.test_readme import COMMANDS

    (command,) = [c for c in COMMANDS if "prune smollm2" in c and "--bench" in c]
    words = shlex.split(command)[1:]
    words[words.index("--eval-limit") + 1] = "20"
    words += ["--num-sequences", "2", "--seq-len", "32", "--heldout-windows", "2", "--no-curve", "--device", "cpu",
              "-q"]
    words[words.index("--out") + 1] = str(tmp_path / "smol-24")
    code, _, err = run(words, timeout=180)
    assert code == 0, err[-3000:]
    bench = pd.read_csv(tmp_path / "smol-24" / "bench.csv")
    assert bench["model"].tolist() == ["original", "pruned"] and (bench["prompt_len"] == 64).all()
    assert bench["num_layers"].tolist() == [30, 24]
    assert (tmp_path / "smol-24" / "eval_retention.csv").is_file()


def test_an_interrupted_prune_names_its_resume_command_and_it_finishes(tiny_dir, tmp_path):
    folder, out = tiny_dir("llama"), tmp_path / "pruned"
    args = ["prune", str(folder), "--num-layers", "1", "--strategy", "drop", "--no-curve", "--heldout-windows", "2",
            "--num-sequences", "48", "--batch-size", "1", "--seq-len", "16", "--device", "cpu", "--out", str(out),
            "--no-report", "-q"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "depthprobe", *args], stderr=subprocess.PIPE, text=True, env=env)
    progress = out / "drop_progress.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if progress.is_file() and len(progress.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in err
    (line,) = error_lines(err)
    assert f"is kept in {out}/" in line
    command = line.split("continue with: ")[1]
    assert command == "depthprobe " + shlex.join([*args, "--resume"])
    code, _, err = run(shlex.split(command)[1:])
    assert code == 0, err
    assert json.loads((out / "prune.json").read_text())["removed"]


#: a stand-in for an architecture whose layers refuse to run anywhere but at their own index (they
#: read state stored under it): Llama decoder layers that raise once ``layer_idx`` was renumbered.
#: Loaded as ``sitecustomize`` in the CLI's process; its frames are not depthprobe's.
REFUSING_LAYERS = """
import transformers.models.llama.modeling_llama as llama
_forward = llama.LlamaDecoderLayer.forward
def forward(self, *args, **kwargs):
    if self.__dict__.setdefault("first_layer_idx", self.self_attn.layer_idx) != self.self_attn.layer_idx:
        raise RuntimeError("this layer reads the state stored under its own index")
    return _forward(self, *args, **kwargs)
llama.LlamaDecoderLayer.forward = forward
"""


def test_a_sweep_the_model_refuses_keeps_the_rest(tiny_dir, tmp_path, monkeypatch):
    """A model whose layers break when blocks are skipped (renumbered): the API leaves the drop
    sweep out with its reason; the CLI saves the other metrics, then one line."""
    import transformers.models.llama.modeling_llama as llama

    patch = tmp_path / "patch"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(REFUSING_LAYERS)
    namespace: dict = {}
    monkeypatch.setattr(llama.LlamaDecoderLayer, "forward", llama.LlamaDecoderLayer.forward)  # restored after
    exec(compile(REFUSING_LAYERS, str(patch / "sitecustomize.py"), "exec"), namespace)
    folder = tiny_dir("llama")
    model, tok = depthprobe.load_model(folder, device="cpu")
    result = depthprobe.analyze(model, tok, config=depthprobe.ProbeConfig(metrics="angular,drop", num_sequences=2,
                                                                          seq_len=16), progress=False,
                                options={"block_sizes": ()})
    reason = result.summary["unsupported"]["drop"]
    assert reason.startswith("not supported for") and "\n" not in reason and "its own index" in reason
    assert "drop_delta_loss" not in result.layers and np.isfinite(result.layers["angular_distance"]).all()
    assert any(n.startswith("drop: not supported") for n in result.summary["notes"])
    out = tmp_path / "run"
    code, _, err = run(["analyze", folder, "--metrics", "angular,drop", "--num-sequences", "2", "--seq-len", "16",
                        "--block-sizes", "", "--out", str(out)], env={"PYTHONPATH": f"{patch}{os.pathsep}{ROOT}"})
    assert code == 2 and "Traceback" not in err
    (line,) = error_lines(err)
    assert line.startswith("Error: --metrics drop is not supported for") and f"saved in {out}" in line
    saved = pd.read_csv(out / "layers.csv")
    assert np.isfinite(saved["angular_distance"]).all() and "drop_delta_loss" not in saved


def test_a_sweep_failing_in_depthprobe_code_is_a_bug_not_a_refusal(monkeypatch, tiny_dir):
    """Only the model's own code refusing skipped blocks becomes a refusal: an error raised in
    depthprobe's code (here an IndexError in a metric) propagates with its traceback."""
    from depthprobe import analysis
    from depthprobe.probes import metrics as M

    def broken_sweep(ctx):
        return M.next_token_nll_sum(torch.zeros(2, 3, 4), torch.zeros(5, dtype=torch.long))

    monkeypatch.setitem(analysis.SWEEPS, "drop", broken_sweep)
    model, _ = depthprobe.load_model(str(tiny_dir("llama")), device="cpu")
    with pytest.raises(IndexError):
        depthprobe.analyze(model, windows=torch.randint(0, 64, (2, 16)), metrics="angular,drop", progress=False)


def test_layer_major_execution_of_blocks_that_share_state_is_refused_before_the_weights(tmp_path):
    """HY-V4's shared indexer layers read the top-k an earlier layer left, so its blocks cannot run
    one at a time: ``--execution layer`` is refused from the config, in one line, nothing loaded."""
    from depthprobe.probes.offload import use_layer_major
    from tests import arch_coverage as cov

    model = cov.build_tiny("hy_v4")
    folder = tmp_path / "hy_v4"
    model.save_pretrained(folder)
    cov.tokenizer().save_pretrained(folder)
    code, _, err = run(["analyze", folder, "--metrics", "drop", "--execution", "layer", "--num-sequences", "2",
                        "--seq-len", "16", "--out", tmp_path / "run", "-v"])
    assert code == 2 and "Traceback" not in err and not loaded_weights(err)
    (line,) = error_lines(err)
    assert line.startswith("Error: --execution layer cannot run HYV4ForCausalLM: its 'shared'")
    with pytest.raises(depthprobe.DepthprobeError) as refused:  # the API says the same, after the load
        use_layer_major("layer", model)
    assert line == f"Error: {refused.value}"
    assert not use_layer_major("auto", model)  # batch-major, where every drop reruns its prefix
