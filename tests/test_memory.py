"""The memory plan (made before loading), --dtype auto, the refusal, and analysis of a model
offloaded to disk by accelerate (equal to the in-memory run)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

import depthprobe
from depthprobe.cli import main
from depthprobe.config import ProbeConfig as Workload
from depthprobe.data import Windows
from depthprobe.errors import DepthprobeError
from depthprobe.model import memory
from depthprobe.model.memory import GIB, estimate, model_shape, parse_max_memory
from tests.tiny_models import build_tiny, random_ids, save_tiny


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory):
    """A tiny Llama saved in bfloat16, untied head (what a 7B checkpoint looks like)."""
    folder = tmp_path_factory.mktemp("llama-bf16")
    model = build_tiny("llama", hidden_size=64, intermediate_size=128, tie_word_embeddings=False)
    model.to(torch.bfloat16).save_pretrained(folder)
    from tests.tiny_models import tiny_tokenizer

    tiny_tokenizer().save_pretrained(folder)
    return folder, model


def test_shape_counts_equal_the_real_model(llama_bf16):
    folder, model = llama_bf16
    config = model.config
    shape = model_shape(config, folder)
    assert shape.num_parameters == sum(p.numel() for p in model.parameters())
    assert shape.block_parameters == sum(p.numel() for p in model.model.layers.parameters())
    assert (shape.num_layers, shape.hidden, shape.intermediate, shape.vocab) == (4, 64, 128, 128)
    # stored dtype and data size from the safetensors header alone
    assert shape.checkpoint_dtype == torch.bfloat16 and shape.safetensors
    assert shape.checkpoint_bytes == sum(t.numel() * 2 for t in model.state_dict().values())


def test_tied_embeddings_count_once(tmp_path):
    model = build_tiny("llama", tie_word_embeddings=True)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    shape = model_shape(model.config, tmp_path)
    assert shape.num_parameters == sum(p.numel() for p in model.parameters())


def test_plan_parts_follow_the_workload(llama_bf16):
    """What each part of the plan depends on (its sizes are held against measured peaks in
    test_plan_holds_against_measured_peaks_of_small_real_runs, not restated here)."""
    folder, model = llama_bf16
    shape = model_shape(model.config, folder)
    work = Workload(metrics=("angular", "grad", "drop"), batch_size=2, seq_len=16, num_sequences=6)
    plan = estimate(shape, torch.float32, work, "cpu", {"cpu": 64 * GIB})
    assert plan.weights == sum(p.numel() for p in model.parameters()) * 4 and not plan.mapped  # an up-cast copy
    assert plan.gradients == shape.block_parameters * 4  # several batches: every block gradient's running sum
    assert estimate(shape, torch.float32, replace(work, metrics=("angular", "grad"))).states == 0
    assert estimate(shape, torch.float32, replace(work, metrics=("variance", "grad", "drop"))).hooks < plan.hooks
    longer = estimate(shape, torch.float32, replace(work, seq_len=32))
    assert longer.activations > plan.activations and longer.states == 2 * plan.states
    same = estimate(shape, torch.bfloat16, work, "cpu", {"cpu": 64 * GIB})
    assert same.mapped and same.peak_resident == same.peak_anonymous + same.weights  # stays memory-mapped


def test_dtype_auto_float32_then_checkpoint_dtype_then_refusal(llama_bf16):
    folder, model = llama_bf16
    shape = model_shape(model.config, folder)
    # long windows: the run, not transformers' loading peak, sets the peak of this tiny model
    work = Workload(metrics=("angular", "grad"), batch_size=64, seq_len=2048, num_sequences=64)
    fp32 = estimate(shape, torch.float32, work, "cpu", {"cpu": 0})
    bf16 = estimate(shape, torch.bfloat16, work, "cpu", {"cpu": 0})
    plenty = {"cpu": 10 * fp32.peak_resident}
    plan, note = memory.choose_dtype(shape, work, "cpu", plenty)
    assert plan.dtype == torch.float32 and note is None
    between = {"cpu": int((bf16.peak_resident + fp32.peak_resident) / 2 / memory.HEADROOM)}
    plan, note = memory.choose_dtype(shape, work, "cpu", between)
    assert plan.dtype == torch.bfloat16 and "loading in bfloat16" in note and "\n" not in note
    lighter = estimate(shape, torch.bfloat16, replace(work, metrics=("angular",)), "cpu", {})
    assert lighter.peak_anonymous < bf16.peak_anonymous
    too_little = {"cpu": int((lighter.peak_anonymous + bf16.peak_anonymous) / 2 / memory.HEADROOM)}
    with pytest.raises(DepthprobeError, match="--offload-folder") as exc:
        memory.choose_dtype(shape, work, "cpu", too_little)
    assert "\n" not in str(exc.value) and "--metrics without grad" in str(exc.value)


def test_fallback_dtype():
    assert memory.fallback_dtype(torch.float16, "cpu") == torch.bfloat16  # CPU float16 is slow
    assert memory.fallback_dtype(torch.float16, "cuda") == torch.float16
    assert memory.fallback_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    assert memory.fallback_dtype(torch.float32, "cpu") == torch.bfloat16  # GGUF de-quantized


def test_parse_max_memory():
    assert parse_max_memory("0:70GiB, cpu:20GiB,cuda:1:10GB") == {0: "70GiB", "cpu": "20GiB", 1: "10GB"}
    for bad in ("70GiB", "cpu:lots", "tpu:3GB", ""):
        with pytest.raises(DepthprobeError, match="--max-memory"):
            parse_max_memory(bad)


def test_dry_run_prints_the_plan_and_loads_nothing(llama_bf16, capsys, monkeypatch):
    folder, _ = llama_bf16
    monkeypatch.setattr("depthprobe.model.load._from_pretrained", _no_loading)
    code, out, _ = run_cli(["analyze", str(folder), "--dry-run", "--device", "cpu", "--metrics", "angular,drop"], capsys)
    assert code == 0
    assert "memory plan" in out and "peak, anonymous memory" in out and "available on cpu" in out


def test_no_fit_is_refused_in_one_line_before_loading(llama_bf16, capsys, monkeypatch):
    folder, _ = llama_bf16
    monkeypatch.setattr("depthprobe.model.load._from_pretrained", _no_loading)
    monkeypatch.setattr(memory, "available_memory", lambda: {"cpu": 1024})
    code, _, err = run_cli(["analyze", str(folder), "--device", "cpu", "--seq-len", "64"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "nothing was loaded" in err and "--offload-folder" in err


def test_auto_dtype_loads_bfloat16_when_float32_does_not_fit(llama_bf16, monkeypatch, caplog):
    folder, model = llama_bf16
    shape = model_shape(model.config, folder)
    fp32 = estimate(shape, torch.float32, Workload(), "cpu", {"cpu": 0})
    bf16 = estimate(shape, torch.bfloat16, Workload(), "cpu", {"cpu": 0})
    between = int((fp32.peak_resident + bf16.peak_resident) / 2 / memory.HEADROOM)
    monkeypatch.setattr(memory, "available_memory", lambda: {"cpu": between})
    loaded, _ = depthprobe.load_model(folder, device="cpu")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert any("loading in bfloat16" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(memory, "available_memory", lambda: {"cpu": 64 * GIB})
    loaded, _ = depthprobe.load_model(folder, device="cpu")
    assert next(loaded.parameters()).dtype == torch.float32


def _no_loading(*args, **kwargs):
    raise AssertionError("weights were loaded")


# ---------------------------------------------------------------------------- offloading
@pytest.fixture(scope="module")
def offload_pair(tmp_path_factory):
    folder = save_tiny("llama", tmp_path_factory.mktemp("llama-off"), hidden_size=64, intermediate_size=128)
    in_memory, _ = depthprobe.load_model(folder, device="cpu", dtype="float32")
    offloaded, _ = depthprobe.load_model(folder, dtype="float32", max_memory="cpu:300KB",
                                         offload_folder=folder / "offload")
    return in_memory, offloaded


def test_offloaded_model_gives_the_in_memory_numbers(offload_pair):
    in_memory, offloaded = offload_pair
    placement = set(offloaded.hf_device_map.values())
    assert placement == {"cpu", "disk"}  # some blocks resident, the rest read from disk per forward
    assert memory.offloaded_modules(offloaded) and not memory.offloaded_modules(in_memory)
    windows = Windows(random_ids(4, 16), "random ids")
    metrics = "angular,variance,lens,drop"
    ref = depthprobe.analyze(in_memory, windows=windows, metrics=metrics, batch_size=2, progress=False)
    got = depthprobe.analyze(offloaded, windows=windows, metrics=metrics, batch_size=2, progress=False)
    assert list(got.layers.columns) == list(ref.layers.columns)
    mid_columns = [c for c in ref.layers.columns if c.endswith("_mid")]
    assert mid_columns and ref.layers[mid_columns].notna().all().all()
    # finding the mid state would read every offloaded block once more: left out, and the notes say so
    assert got.layers[mid_columns].isna().all().all()
    assert any("offloaded" in note and "mid state" in note for note in got.summary["notes"])
    for column in ref.layers.columns.drop(mid_columns):
        np.testing.assert_allclose(got.layers[column], ref.layers[column], rtol=1e-5, atol=1e-6, err_msg=column)
    assert got.summary["base_loss"] == pytest.approx(ref.summary["base_loss"], rel=1e-6)
    # the in-memory loss is the model's own
    with torch.no_grad():
        own = in_memory(input_ids=windows.input_ids, labels=windows.input_ids).loss
    assert ref.summary["base_loss"] == pytest.approx(float(own), rel=1e-5)


def test_attribution_on_offloaded_weights_is_refused(offload_pair):
    _, offloaded = offload_pair
    with pytest.raises(DepthprobeError, match="offloaded"):
        memory.check_offload_supports(offloaded, ("angular", "attribution"))
    memory.check_offload_supports(offloaded, ("angular", "grad", "drop"))  # grad runs block by block


def test_cli_offload_options_reach_accelerate(tiny_dir, tmp_path, capsys):
    folder = tiny_dir("llama")
    out = tmp_path / "run"
    code, _, err = run_cli(
        ["analyze", str(folder), "--metrics", "angular,drop", "--num-sequences", "2", "--seq-len", "16",
         "--block-sizes", "", "--max-memory", "cpu:60KB", "--offload-folder", str(tmp_path / "off"),
         "--out", str(out), "--no-report", "-q"],
        capsys,
    )
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dtype"] == "float32"
    layers = pd.read_csv(out / "layers.csv")
    assert len(layers) == 4 and np.isfinite(layers["drop_delta_loss"]).all()
    code, _, err = run_cli(["analyze", str(folder), "--device-map", "everywhere", "--metrics", "angular"], capsys)
    assert code == 2 and "--device-map" in err
    code, _, err = run_cli(["analyze", str(folder), "--metrics", "angular", "--seq-len", "16", "--max-memory", "cpu:1KB",
                            "--offload-folder", str(tmp_path / "off2")], capsys)
    assert code == 2 and "no room for even one block" in err and err.count("\n") == 1


def test_offloaded_auto_dtype_never_writes_an_upcast_copy_to_disk(llama_bf16):
    folder, model = llama_bf16
    shape = model_shape(model.config, folder)
    work = Workload(metrics=("angular",), batch_size=1, seq_len=16)
    small_budget = shape.num_parameters  # bytes: room for a quarter of the float32 weights
    plan, note = memory.choose_dtype(shape, work, "offload", {"cpu": 64 * GIB}, small_budget)
    assert plan.dtype == torch.bfloat16 and "offloaded to disk" in note
    plan, note = memory.choose_dtype(shape, work, "offload", {"cpu": 64 * GIB}, 64 * GIB)
    assert plan.dtype == torch.float32 and note is None  # everything fits in the budget
    f32 = memory.ModelShape(**{**shape.__dict__, "checkpoint_dtype": torch.float32})
    plan, note = memory.choose_dtype(f32, work, "offload", {"cpu": 64 * GIB}, small_budget)
    assert plan.dtype == torch.float32  # stored float32: offloading reads the checkpoint as is


@pytest.mark.slow
@pytest.mark.parametrize("metrics", ["angular,grad", "angular,drop"])
def test_plan_holds_against_measured_peaks_of_small_real_runs(tmp_path, metrics):
    """The plan (``--dry-run``) against the peak anonymous memory of the same run, sampled from
    /proc by benchmarks/_peak.py: never below it (a refusal must not let a run be killed), and
    within the README's 25% where the run, not the fixed loading floor, sets the peak."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from _peak import run_sampled

    folder = save_tiny("llama", tmp_path / "wide", hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                       max_position_embeddings=1024)
    args = [sys.executable, "-m", "depthprobe", "analyze", str(folder), "--metrics", metrics, "--batch-size", "8",
            "--seq-len", "512", "--num-sequences", "8", "--device", "cpu", "--dtype", "float32", "-q",
            "--block-sizes", ""]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    measured = run_sampled(args, env=env)
    assert measured.returncode == 0, measured.output[-2000:]
    plan_text = subprocess.run([*args, "--dry-run"], env=env, capture_output=True, text=True, check=True).stdout
    planned = float(next(line for line in plan_text.splitlines() if "peak, anonymous" in line).split()[-2]) * GIB
    assert planned >= measured.peak_anon
    work = Workload(metrics=tuple(metrics.split(",")), batch_size=8, seq_len=512, num_sequences=8)
    plan = estimate(model_shape(__import__("transformers").AutoConfig.from_pretrained(folder), folder),
                    torch.float32, work)
    if plan.main_pass + memory.RUNTIME_BYTES > memory.LOAD_PEAK_BYTES:  # the run sets the plan's peak
        assert planned <= 1.25 * measured.peak_anon
