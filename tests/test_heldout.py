"""Held-out windows never overlap the calibration windows; held-out loss of a pruned model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from depthprobe.cli import main
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


def _plain_heldout_loss(folder, calibration_kwargs, num_sequences, seq_len, heldout_num=16):
    """Mean over held-out windows (16 by default) of plain transformers' own loss on the exported folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    cal = make_windows(tok, num_sequences=num_sequences, seq_len=seq_len, **calibration_kwargs)
    held = heldout_windows(tok, num_sequences=heldout_num, seq_len=seq_len, calibration=cal)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        losses = [model(input_ids=ids[None], labels=ids[None]).loss.item() for ids in held.input_ids]
    return sum(losses) / len(losses), cal, held


def test_pruned_heldout_loss_equals_plain_transformers(tiny_dir, tmp_path):
    out = tmp_path / "pruned"
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 60)
    with pytest.raises(SystemExit) as exc:
        main(["prune", str(tiny_dir("llama")), "--num-layers", "2", "--text-file", str(text), "--num-sequences", "3",
              "--seq-len", "32", "--out", str(out), "--quiet", "--no-report", "--device", "cpu"])
    assert exc.value.code == 0
    info = json.loads((out / "prune.json").read_text())
    want, cal, held = _plain_heldout_loss(out, {"text_file": text}, 3, 32)
    assert info["heldout_loss_after"] == pytest.approx(want, abs=1e-5)
    assert info["heldout_source"] == held.source and info["heldout_source"].startswith("heldout:builtin[")
    lo, hi = info["heldout_loss_after_interval"]
    assert lo <= info["heldout_loss_after"] <= hi
    curve = pd.read_csv(out / "prune_curve.csv")
    greedy = curve[curve.strategy == "greedy"].set_index("num_removed")
    assert greedy.loc[2, "heldout_loss"] == pytest.approx(info["heldout_loss_after"], abs=1e-9)
    assert greedy.loc[0, "heldout_loss"] == pytest.approx(info["heldout_loss_before"], abs=1e-9)
    assert (curve["loss_low"] <= curve["loss"] + 1e-9).all() and (curve["loss"] <= curve["loss_high"] + 1e-9).all()
    assert np.allclose(curve["heldout_perplexity"], np.exp(curve["heldout_loss"]))


def test_bootstrap_interval_is_the_percentiles_of_resampled_means():
    """Against the exact bootstrap distribution: all 5^5 equally likely resamples of 5 values,
    enumerated; the seeded Monte-Carlo interval lands on its 2.5% and 97.5% points."""
    import itertools

    from depthprobe.evaluate.heldout import mean_interval

    values = np.array([1.0, 2.0, 4.0, 8.0, 3.0])
    exact = np.array([values[list(draw)].mean() for draw in itertools.product(range(5), repeat=5)])
    want_lo, want_hi = np.percentile(exact, [2.5, 97.5])
    mean, lo, hi = mean_interval(values, n_boot=20000, seed=3)
    assert mean == pytest.approx(3.6)
    step = 0.2  # resample means lie on a grid of 1/5: a percentile may land on either side of a jump
    assert lo == pytest.approx(want_lo, abs=step + 1e-9) and hi == pytest.approx(want_hi, abs=step + 1e-9)
    _, lo90, hi90 = mean_interval(values, n_boot=20000, level=0.9, seed=3)
    assert (lo90, hi90) == pytest.approx(tuple(np.percentile(exact, [5, 95])), abs=step + 1e-9)
    assert mean_interval(values, n_boot=20000, seed=3) == (mean, lo, hi)  # seeded: the same numbers again
    assert mean_interval(np.full(4, 2.5), n_boot=200) == (2.5, 2.5, 2.5)  # nothing varies, nothing to resample


@pytest.mark.slow
def test_smollm2_pruned_heldout_loss_equals_plain_transformers(tmp_path):
    out = tmp_path / "smol-pruned"
    with pytest.raises(SystemExit) as exc:
        main(["prune", "smollm2", "--remove", "20,24,27", "--no-curve", "--num-sequences", "2", "--seq-len", "64",
              "--out", str(out), "--quiet", "--no-report", "--device", "cpu"])
    assert exc.value.code == 0
    info = json.loads((out / "prune.json").read_text())
    want, _, _ = _plain_heldout_loss(out, {}, 2, 64)
    assert info["heldout_loss_after"] == pytest.approx(want, abs=1e-5)
    assert info["heldout_loss_after"] > info["heldout_loss_before"]


def test_the_whole_text_is_tokenized_once_per_tokenizer_and_again_after_new_tokens():
    from depthprobe import data

    tok = tiny_tokenizer()
    text = builtin_text()
    first = data._whole_text_ids(tok, text, chunk_chars=50_000)
    assert list(first) == _stream(tok, text)  # chunked on blank lines: the same ids as one call
    assert data._whole_text_ids(tok, text, chunk_chars=50_000) is first  # read once
    held = heldout_windows(tok, num_sequences=2, seq_len=40)
    assert held.input_ids.flatten().tolist() == list(first[-80:])
    word = max(set(text.split()), key=text.split().count)  # the commonest word becomes one new token
    tok.add_tokens([word])
    again = data._whole_text_ids(tok, text, chunk_chars=50_000)
    assert again is not first and list(again) == _stream(tok, text) and tok.convert_tokens_to_ids(word) in again
