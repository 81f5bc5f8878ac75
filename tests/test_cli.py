"""The analyze command end to end, and every user mistake as a one-line error with exit 2."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import transformers

import depthprobe
from depthprobe.cli import main
from depthprobe.errors import DepthprobeError


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_analyze_writes_the_contract_files(tiny_dir, tmp_path, capsys):
    folder = tiny_dir("llama")
    text = tmp_path / "t.txt"
    text.write_text("abcdefghij klmnopqrstu vwxyz 0123456789 " * 40)
    out = tmp_path / "run"
    code, stdout, _ = run_cli(
        [
            "analyze", str(folder), "--text-file", str(text), "--num-sequences", "3", "--seq-len", "32",
            "--metrics", "angular,variance,grad", "--out", str(out), "--device", "cpu", "--no-report",
        ],
        capsys,
    )
    assert code == 0
    assert {"summary.json", "layers.csv", "angular_distance.csv"} <= {p.name for p in out.iterdir()}
    layers = pd.read_csv(out / "layers.csv")
    assert list(layers.columns[:2]) == ["layer", "angular_distance"] and len(layers) == 4
    summary = json.loads((out / "summary.json").read_text())
    for key in ("model", "architecture", "num_layers", "num_tokens", "base_loss", "base_perplexity", "dtype",
                "device", "versions", "timings_s"):
        assert key in summary, key
    assert summary["num_tokens"] == 96 and summary["num_layers"] == 4
    assert set(summary["timings_s"]) >= {"angular", "variance", "grad"}
    # the same numbers as the Python API on the same windows
    model, tok = depthprobe.load_model(str(folder), device="cpu")
    api = depthprobe.analyze(model, tok, text_file=text, num_sequences=3, seq_len=32,
                             metrics="angular,variance,grad", progress=False)
    np.testing.assert_allclose(layers.to_numpy(), api.layers.to_numpy(), rtol=1e-6)
    assert "base loss" in stdout and "angular_distance" in stdout


@pytest.fixture
def unknown_arch(tmp_path):
    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "definitely-not-a-model", "hidden_size": 8}))
    return folder


@pytest.mark.parametrize(
    "args, message",
    [
        (["analyze", "./no/such/model"], "not found"),
        (["analyze", "meta-llama/Llama-2-7bxx"], "offline alternatives"),
        (["analyze", "{unknown}"], "unknown architecture"),
        (["analyze", "{t5}"], "is an encoder-decoder model (t5)"),
        (["prune", "{t5}", "--num-layers", "1", "--out", "{out}"], "is an encoder-decoder model (t5)"),
        (["analyze", "{llama}", "--seq-len", "0"], "--seq-len"),
        (["analyze", "{llama}", "--text-file", "{empty}"], "empty"),
        (["analyze", "{llama}", "--layers-path", "model.nothing"], "--layers-path"),
        (["analyze", "{llama}", "--metrics", "angular,bogus"], "unknown metric"),
        (["analyze", "{llama}", "--num-sequences", "500", "--seq-len", "100", "--text-file", "{short}"], "tokens"),
        (["analyze", "{llama}", "--seq-len", "4096"], "longer than this model allows"),
        (["analyze", "{llama}", "--device", "cuda"], "CUDA is not available"),
        (["analyze", "smollm2", "--gguf-file", "missing.gguf"], "not found"),
        (["analyze", "{llama}", "--batch-size", "0"], "--batch-size"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(args, message, tiny_dir, unknown_arch, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    t5 = tmp_path / "t5"  # a config is enough: the refusal comes before any weight is read
    transformers.T5Config(d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2, vocab_size=64).save_pretrained(t5)
    subs = {"{llama}": str(tiny_dir("llama")), "{unknown}": str(unknown_arch), "{empty}": str(empty),
            "{short}": str(short), "{t5}": str(t5), "{out}": str(tmp_path / "out")}
    if "{llama}" in args and "--seq-len" not in args:
        args = [*args, "--seq-len", "32"]  # the tiny model has 128 positions
    args = [subs.get(a, a) for a in args] + ["--quiet"]
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("Error:") and message in lines[0], lines[0]
    assert "Traceback" not in err


def test_help_shows_examples(capsys):
    code, out, _ = run_cli(["analyze", "--help"], capsys)
    assert code == 0 and "Examples:" in out and "--metrics" in out


def test_load_model_runs_no_repo_code_unless_asked(remote_code_model):
    """The Python API's default: a folder whose config maps to its own code is refused in one
    line naming the flag, and that code never runs (the CLI's case: test_faults_security)."""
    folder, marker = remote_code_model
    with pytest.raises(DepthprobeError, match="trust_remote_code|--trust-remote-code") as exc:
        depthprobe.load_model(str(folder), device="cpu")
    assert "\n" not in str(exc.value)
    assert not marker.exists()


def test_nan_activations_save_results_then_exit_2(tiny_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "nan-model"
    import shutil

    shutil.copytree(tiny_dir("llama"), folder)
    weights = load_file(folder / "model.safetensors")
    key = "model.layers.2.mlp.down_proj.weight"
    weights[key][0, 0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "run"
    code, _, err = run_cli(
        ["analyze", str(folder), "--seq-len", "16", "--num-sequences", "2", "--metrics", "angular,variance",
         "--out", str(out), "--quiet", "--no-report"],
        capsys,
    )
    assert code == 2 and "Traceback" not in err
    error = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "from layer 2" in error[0] and str(out) in error[0]
    layers = pd.read_csv(out / "layers.csv")  # nothing computed is lost
    assert np.isfinite(layers.loc[:1, "activation_variance"]).all()
    assert layers.loc[2:, "activation_variance"].isna().all()


def test_interrupted_sweep_keeps_main_pass(tiny_dir, tmp_path, capsys, monkeypatch):
    from depthprobe import analysis as analyze_mod

    def interrupted_sweep(ctx):
        raise KeyboardInterrupt

    monkeypatch.setitem(analyze_mod.SWEEPS, "drop", interrupted_sweep)
    out = tmp_path / "run"
    code, _, err = run_cli(
        ["analyze", str(tiny_dir("llama")), "--seq-len", "16", "--num-sequences", "2", "--metrics",
         "angular,drop", "--out", str(out), "--quiet", "--no-report"],
        capsys,
    )
    assert code == 2
    command = (f"depthprobe analyze {tiny_dir('llama')} --seq-len 16 --num-sequences 2 --metrics angular,drop "
               f"--out {out} --quiet --no-report --force")
    assert [line for line in err.splitlines() if line.startswith("Error:")] == [
        "Error: interrupted during the drop sweep; the main pass (angular_distance, block_influence) finished and "
        f"is saved in {out}/; rerun with: {command}"
    ]  # no drop batch finished: nothing to --resume (tests/test_user_steps.py covers the other case)
    assert np.isfinite(pd.read_csv(out / "layers.csv")["angular_distance"]).all()
