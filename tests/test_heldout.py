"""Held-out windows never overlap the calibration windows; held-out loss of a pruned model."""

from __future__ import annotations

import pytest

from depthprobe.data import builtin_text, heldout_windows, make_windows
from depthprobe.errors import DepthprobeError
from tests.tiny_models import tiny_tokenizer


def _stream(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_builtin_heldout_is_the_tail_and_disjoint_from_calibration():
    tok = tiny_tokenizer()
    cal = make_windows(tok, num_sequences=4, seq_len=64)
    held = heldout_windows(tok, num_sequences=3, seq_len=50, calibration=cal)
    stream = _stream(tok, builtin_text())
    assert held.input_ids.flatten().tolist() == stream[-150:]
    assert cal.input_ids.flatten().tolist() == stream[:256]
    start = len(stream) - 150
    assert start >= 256  # token positions of the two sets are disjoint
    assert held.source == f"heldout:builtin[{start}:{len(stream)}]"
    # the slice does not move with the calibration size (comparable across runs)
    again = heldout_windows(tok, num_sequences=3, seq_len=50, calibration=None)
    assert (again.input_ids == held.input_ids).all()


def test_heldout_refuses_when_text_cannot_hold_both(tmp_path):
    tok = tiny_tokenizer()
    path = tmp_path / "t.txt"
    path.write_text("one two three four five six seven eight nine ten.\n\n" * 40)
    n_tokens = len(_stream(tok, path.read_text()))
    cal = make_windows(tok, num_sequences=2, seq_len=n_tokens // 3, text_file=path)
    with pytest.raises(DepthprobeError, match="do not both fit"):
        heldout_windows(tok, num_sequences=2, seq_len=n_tokens // 3, calibration=cal, text_file=str(path))
    held = heldout_windows(tok, num_sequences=1, seq_len=n_tokens // 4, calibration=cal, text_file=str(path))
    stream = _stream(tok, path.read_text())
    assert held.input_ids.flatten().tolist() == stream[-(n_tokens // 4):]
    assert len(stream) - n_tokens // 4 >= cal.input_ids.numel()


def test_heldout_of_another_file_is_its_first_tokens(tmp_path):
    tok = tiny_tokenizer()
    path = tmp_path / "other.txt"
    path.write_text("held out prose that is not calibration text.\n\n" * 30)
    cal = make_windows(tok, num_sequences=2, seq_len=32)
    held = heldout_windows(tok, num_sequences=2, seq_len=16, calibration=cal, text_file=str(path))
    assert held.input_ids.flatten().tolist() == _stream(tok, path.read_text())[:32]
    assert held.source == f"heldout:{path}"


def test_heldout_bad_input_is_one_line():
    tok = tiny_tokenizer()
    cal = make_windows(tok, num_sequences=2, seq_len=32)
    with pytest.raises(DepthprobeError, match="at most one"):
        heldout_windows(tok, num_sequences=2, seq_len=8, text_file="a.txt", dataset="b")
    with pytest.raises(DepthprobeError, match="longer than this model"):
        heldout_windows(tok, num_sequences=2, seq_len=64, calibration=cal, max_positions=32)
    with pytest.raises(DepthprobeError, match="too many|do not both fit"):
        heldout_windows(tok, num_sequences=10_000, seq_len=512, calibration=cal)
