"""Calibration windows: one stream, no special tokens, consecutive, deterministic."""

from __future__ import annotations

import json

import pytest

from depthprobe.data import builtin_text, make_windows
from depthprobe.errors import DepthprobeError
from tests.tiny_models import tiny_tokenizer


def test_windows_are_consecutive_slices_of_one_stream(tmp_path):
    tok = tiny_tokenizer()
    text = "hello world, this is calibration text!\n\n" * 50
    path = tmp_path / "t.txt"
    path.write_text(text)
    w = make_windows(tok, num_sequences=3, seq_len=20, text_file=path)
    stream = tok(text, add_special_tokens=False)["input_ids"]
    assert w.input_ids.shape == (3, 20)
    assert w.input_ids.flatten().tolist() == stream[:60]
    assert w.source == str(path)


def test_builtin_corpus_is_large_and_deterministic():
    text = builtin_text()
    assert len(text) > 400_000 and text == builtin_text()
    tok = tiny_tokenizer()
    a = make_windows(tok, num_sequences=2, seq_len=32)
    b = make_windows(tok, num_sequences=2, seq_len=32)
    assert a.source == "builtin" and (a.input_ids == b.input_ids).all()


def test_long_text_is_tokenized_like_one_stream():
    """Chunked tokenization of a long text gives the same ids as tokenizing it whole."""
    tok = tiny_tokenizer()
    text = builtin_text()[:300_000]
    whole = tok(text, add_special_tokens=False)["input_ids"]
    w = make_windows(tok, num_sequences=4, seq_len=50_000, text=text)
    assert w.input_ids.flatten().tolist() == whole[:200_000]


def test_local_dataset_folder(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    rows = [{"text": f"document number {i} with some words in it."} for i in range(40)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tok = tiny_tokenizer()
    w = make_windows(tok, num_sequences=2, seq_len=30, dataset=str(folder))
    stream = tok("\n\n".join(r["text"] for r in rows), add_special_tokens=False)["input_ids"]
    assert w.input_ids.flatten().tolist() == stream[:60]
    assert w.source.startswith("dataset:")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_sequences=1000, seq_len=1000, text="short text"), "need 1000000"),
        (dict(num_sequences=0, seq_len=8), "--num-sequences"),
        (dict(num_sequences=1, seq_len=0), "--seq-len"),
        (dict(num_sequences=1, seq_len=300, max_positions=128), "longer than this model allows"),
        (dict(num_sequences=1, seq_len=8, text_file="/nonexistent/file.txt"), "not found"),
    ],
)
def test_bad_requests_are_user_errors(kwargs, message):
    with pytest.raises(DepthprobeError, match=message):
        make_windows(tiny_tokenizer(), **kwargs)


def test_empty_text_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n")
    with pytest.raises(DepthprobeError, match="empty"):
        make_windows(tiny_tokenizer(), num_sequences=1, seq_len=8, text_file=path)
