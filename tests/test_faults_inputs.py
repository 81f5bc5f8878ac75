"""Corrupt, mismatched and odd inputs: each a one-line error with exit 2, or a clean completion.

Every case builds the bad input from a good tiny model and runs the real command in-process.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from depthprobe.cli import main
from depthprobe.data import builtin_text, make_windows
from tests.tiny_models import VOCAB, tiny_tokenizer

R = pytest.mark.reliability
FAST = ["--num-sequences", "2", "--seq-len", "16", "--device", "cpu", "--quiet", "--metrics", "angular"]


def run_cli(args, capsys):
    capsys.readouterr()  # drop what fixtures printed (e.g. saving a tiny model)
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def model_copy(tiny_dir, tmp_path):
    """A fresh copy of the tiny Llama folder, to damage."""
    return Path(shutil.copytree(tiny_dir("llama"), tmp_path / "model"))


class Payload:
    """Unpickling this runs ``touch MARKER``: what a hostile checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _truncate_half(folder: Path) -> None:
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _truncate_header(folder: Path) -> None:
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5])


def _garbage_header(folder: Path) -> None:
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32  # the JSON header is no longer JSON
    f.write_bytes(bytes(data))


def _empty_weights(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"")


def _layers_in_config(n: int):
    def damage(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config["num_hidden_layers"] = n
        (folder / "config.json").write_text(json.dumps(config))

    return damage


def _config_not_json(folder: Path) -> None:
    (folder / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 4,')


def _big_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>"] + [chr(c) for c in range(33, 33 + 600)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>").save_pretrained(folder)


@pytest.mark.parametrize("damage, needles", [
    pytest.param(_truncate_half, ("model.safetensors", "truncated"), id="safetensors-half",
                 marks=R("model.safetensors cut to half its size", "exit 2: 'is truncated: its tensors need N bytes'")),
    pytest.param(_truncate_header, ("truncated",), id="safetensors-5-bytes",
                 marks=R("model.safetensors cut inside its 8-byte header", "exit 2: 'is truncated (5 bytes ...)'")),
    pytest.param(_garbage_header, ("safetensors",), id="safetensors-garbage-header",
                 marks=R("model.safetensors with a garbled JSON header", "exit 2: 'corrupt header' / 'truncated'")),
    pytest.param(_empty_weights, ("truncated",), id="safetensors-empty",
                 marks=R("model.safetensors of 0 bytes", "exit 2: 'is truncated'")),
    pytest.param(_layers_in_config(6), ("says 6 layers", "hold 4 blocks"), id="config-more-layers",
                 marks=R("config.json says 6 layers, the weights hold 4 blocks",
                         "exit 2 (transformers alone would initialise 2 blocks at random, silently)")),
    pytest.param(_layers_in_config(2), ("says 2 layers", "hold 4 blocks"), id="config-fewer-layers",
                 marks=R("config.json says 2 layers, the weights hold 4 blocks",
                         "exit 2 (transformers alone would drop 2 blocks silently)")),
    pytest.param(_config_not_json, ("config.json", "not valid JSON"), id="config-not-json",
                 marks=R("config.json cut mid-way (invalid JSON)", "exit 2: 'is not valid JSON'")),
    pytest.param(_big_tokenizer, ("602 tokens", "128 rows"), id="tokenizer-vocab-mismatch",
                 marks=R("a tokenizer of 602 tokens with a 128-row embedding",
                         "exit 2 at load (was an IndexError traceback mid-analysis)")),
])
def test_damaged_model_folder_is_one_line(damage, needles, model_copy, capsys):
    damage(model_copy)
    code, _, err = run_cli(["analyze", model_copy, *FAST], capsys)
    assert_one_line_error(code, err, *needles)


@R("a .gguf file that is plain text", "exit 2: 'is not a GGUF file'")
def test_fake_gguf_file(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_text("this is not a gguf file\n" * 10)
    code, _, err = run_cli(["analyze", fake, *FAST], capsys)
    assert_one_line_error(code, err, "not a GGUF file")


@R("--gguf-file naming a non-GGUF file inside a model folder", "exit 2: 'is not a GGUF file'")
def test_fake_gguf_in_folder(model_copy, capsys):
    (model_copy / "weights.gguf").write_bytes(b"\x00" * 64)
    code, _, err = run_cli(["analyze", model_copy, "--gguf-file", "weights.gguf", *FAST], capsys)
    assert_one_line_error(code, err, "not a GGUF file")


@R("pytorch_model.bin whose pickle runs a shell command when loaded", "exit 2, refused; the command never runs")
def test_pickled_weights_with_payload_are_refused(model_copy, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    (model_copy / "model.safetensors").unlink()
    with open(model_copy / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": Payload(marker)}, f)
    code, _, err = run_cli(["analyze", model_copy, *FAST], capsys)
    assert_one_line_error(code, err, "refused")
    assert not marker.exists()


TRAIN = ["train", "--preset", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--max-tokens", "5000",
         "--val-windows", "2", "--device", "cpu", "--no-report", "-q"]


@R("`train --resume` on a checkpoint.pt whose pickle runs a shell command", "exit 2, refused (weights_only); "
   "the command never runs")
def test_checkpoint_with_payload_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "PWNED"
    torch.save({"step": 1, "model": Payload(marker)}, out / "checkpoint.pt")
    code, _, err = run_cli([*TRAIN, "--out", out, "--resume"], capsys)
    assert_one_line_error(code, err, "refusing to unpickle")
    assert not marker.exists()


@R("`train --resume` on a checkpoint.pt cut to half", "exit 2: 'is truncated or not a checkpoint'")
def test_truncated_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli([*TRAIN, "--out", out], capsys)
    assert code == 0, err
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    code, _, err = run_cli([*TRAIN, "--out", out, "--resume"], capsys)
    assert_one_line_error(code, err, "truncated or not a checkpoint")


@pytest.mark.parametrize("value", [
    pytest.param(float("nan"), id="nan", marks=R("a NaN in block 2's weights", "analysis completes and saves; "
                                                 "summary, notes and report name block 2; exit 2 with one line")),
    pytest.param(float("inf"), id="inf", marks=R("an inf in block 1's weights", "analysis completes and saves; "
                                                 "summary, notes and report name block 1; exit 2 with one line")),
])
def test_nonfinite_weights_complete_and_are_marked(value, model_copy, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    block = 2 if value != value else 1
    weights = load_file(model_copy / "model.safetensors")
    weights[f"model.layers.{block}.self_attn.q_proj.weight"][0, 0] = value
    save_file(weights, model_copy / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "run"
    code, _, err = run_cli(["analyze", model_copy, *FAST[:-2], "--metrics", "angular,variance", "--out", out], capsys)
    assert code == 2 and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("Error:")]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nonfinite_weights"] == [block]
    assert any(f"block(s) {block}:" in note for note in summary["notes"])
    assert f"NaN/inf weights in block(s) {block}" in (out / "report.html").read_text()
    layers = pd.read_csv(out / "layers.csv")
    assert np.isfinite(layers.loc[: block - 1, "activation_variance"]).all()  # blocks before it are measured


def _windows_via_cli(folder, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["analyze", folder, "--text-file", text_file, *FAST[:-2], "--metrics", "angular",
                            "--out", out, "--no-report"], capsys)
    assert code == 0, err
    return pd.read_csv(out / "layers.csv"), json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("encoding", [
    pytest.param("utf-16", marks=R("calibration text file in UTF-16 (with BOM)",
                                    "completes; same tokens as the text read as a string")),
    pytest.param("utf-32", marks=R("calibration text file in UTF-32 (with BOM)",
                                    "completes; same tokens as the text read as a string")),
    pytest.param("utf-8-sig", marks=R("calibration text file in UTF-8 with a BOM",
                                       "completes; the BOM is not a token")),
    pytest.param("latin-1", marks=R("calibration text file in Latin-1 (not valid UTF-8)",
                                     "completes with a logged warning; decoded as Latin-1")),
])
def test_text_file_in_another_encoding(encoding, tiny_dir, tmp_path, capsys):
    text = "Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade. " * 40 + builtin_text()[:3000].encode("ascii", "ignore").decode()
    path = tmp_path / f"text-{encoding}.txt"
    path.write_bytes(text.encode(encoding))
    layers, summary = _windows_via_cli(tiny_dir("llama"), path, tmp_path, capsys)
    # the windows the command used are the windows of the decoded string
    import depthprobe

    model, _ = depthprobe.load_model(str(tiny_dir("llama")), device="cpu")
    windows = make_windows(tiny_tokenizer(), num_sequences=2, seq_len=16, text=text)
    expected = depthprobe.analyze(model, windows=windows, metrics="angular", progress=False).layers
    pd.testing.assert_frame_equal(layers, expected, check_exact=False, rtol=1e-6)
    assert summary["num_tokens"] == 32


@R("calibration text file with no newline at all", "completes; same windows as the string")
def test_text_without_newline(tiny_dir, tmp_path):
    path = tmp_path / "one-line.txt"
    text = "abcdefgh ijklmnop " * 200
    path.write_text(text)
    from_file = make_windows(tiny_tokenizer(), num_sequences=3, seq_len=32, text_file=path)
    from_string = make_windows(tiny_tokenizer(), num_sequences=3, seq_len=32, text=text)
    assert torch.equal(from_file.input_ids, from_string.input_ids)
    assert from_file.input_ids.max() < VOCAB


@R("a binary file (NUL bytes, not text) as --text-file", "exit 2: 'looks binary'")
def test_binary_text_file(tiny_dir, tmp_path, capsys):
    path = tmp_path / "weights.txt"
    path.write_bytes(bytes(range(256)) * 50)
    code, _, err = run_cli(["analyze", tiny_dir("llama"), "--text-file", path, *FAST], capsys)
    assert_one_line_error(code, err, "looks binary")


@R("--dataset wikitext with no network (HF_HUB_OFFLINE=1)", "exit 2: 'cannot load dataset ... use --text-file'")
def test_dataset_without_network(tiny_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code, _, err = run_cli(["analyze", tiny_dir("llama"), "--dataset", "wikitext:wikitext-2-raw-v1", *FAST], capsys)
    assert_one_line_error(code, err, "cannot load dataset", "--text-file")
