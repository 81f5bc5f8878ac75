"""Drop sweeps against naive deletion, greedy against brute force, export round trips."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import depthprobe
from depthprobe.cli import main
from depthprobe.data import Windows
from depthprobe.prune.select import Evaluator, greedy
from depthprobe.prune.sweep import run_drop_sweep
from tests import reference as ref
from tests.tiny_models import FAMILY_NAMES, build_tiny, random_ids


def naive_objective(model, ids, delete=(), zero=None):
    """Loss (or final-state drift for encoders) of a deep copy of ``model`` with blocks
    ``delete`` deleted from its ModuleList, or with sublayer module ``zero(copy)`` zeroed by
    a plain forward hook. Full forward every time: the straightforward way."""
    stack = depthprobe.LayerStack.from_model(model)
    lm = stack.is_causal_lm
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False) if lm else model(input_ids=ids)
        twin = copy.deepcopy(model)
        twin_stack = depthprobe.LayerStack.from_model(twin)
        parent, attr = twin_stack._parent_and_attr()
        keep = [i for i in range(len(stack)) if i not in set(delete)]
        setattr(parent, attr, nn.ModuleList([twin_stack.blocks[i] for i in keep]))
        twin.config.num_hidden_layers = len(keep)
        if getattr(twin.config, "layer_types", None):
            twin.config.layer_types = [model.config.layer_types[i] for i in keep]
        handle = None
        if zero is not None:
            handle = zero(twin).register_forward_hook(
                lambda m, a, o: (torch.zeros_like(o[0]), *o[1:]) if isinstance(o, tuple) else torch.zeros_like(o)
            )
        out = twin(input_ids=ids, use_cache=False) if lm else twin(input_ids=ids)
        if handle is not None:
            handle.remove()
    if lm:
        return ref.lm_loss(out.logits, ids) - ref.lm_loss(full.logits, ids)
    return ref.block_influence(out.last_hidden_state, full.last_hidden_state)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_drop_sweep_matches_naive_deletion(family):
    model = build_tiny(family)
    ids = random_ids(5, 16)
    result = depthprobe.analyze(model, windows=Windows(ids, "r"), metrics="angular,drop", batch_size=2, progress=False,
                                options={"block_sizes": [2, 3]})
    layers, L = result.layers, model.config.num_hidden_layers
    np.testing.assert_allclose(layers["drop_delta_loss"], [naive_objective(model, ids, [i]) for i in range(L)],
                               atol=1e-5)
    stack = depthprobe.LayerStack.from_model(model)
    for kind in ("attn", "mlp"):
        path = {"attn": stack.spec.attn_out, "mlp": stack.spec.mlp_out}[kind]
        want = [
            naive_objective(model, ids, zero=lambda twin, i=i, path=path: depthprobe.LayerStack.from_model(twin)
                            .blocks[i].get_submodule(path))
            for i in range(L)
        ]
        np.testing.assert_allclose(layers[f"drop_delta_loss_{kind}"], want, atol=1e-5)
    blocks = result.tables["block_drop"]
    assert set(blocks["block_size"]) == {2, 3} and len(blocks) == (L - 1) + (L - 2)
    for row in blocks.itertuples():
        assert row.delta_loss == pytest.approx(naive_objective(model, ids, range(row.start, row.end + 1)), abs=1e-5)
        assert row.angular_distance == pytest.approx(result.angular_distance.loc[row.start, row.block_size], rel=1e-9)
    # the per-window table averages to the column
    per_window = result.tables["drop_windows"].groupby("layer")["delta_loss"].mean()
    np.testing.assert_allclose(per_window.to_numpy(), layers["drop_delta_loss"], rtol=1e-12)
    assert result.summary["timings_s"]["drop"] > 0


def test_greedy_matches_brute_force():
    model = build_tiny("llama", num_hidden_layers=6)
    ids = random_ids(4, 16)
    stack = depthprobe.LayerStack.from_model(model)
    steps = greedy(Evaluator(stack, ids, batch_size=3), 3, progress=False)
    removed: list[int] = []
    with torch.no_grad():
        base = ref.lm_loss(model(input_ids=ids).logits, ids)
    for step in steps[1:]:
        costs = {c: naive_objective(model, ids, removed + [c]) for c in range(6) if c not in removed}
        best = min(costs, key=costs.get)
        removed.append(best)
        assert step.removed == sorted(removed)
        assert step.loss == pytest.approx(base + costs[best], abs=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gpt2", "opt"])
def test_export_reloads_with_plain_transformers(family, tiny_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 60)
    with pytest.raises(SystemExit) as exc:
        main(["prune", str(tiny_dir(family)), "--num-layers", "2", "--strategy", "greedy", "--text-file", str(text),
              "--num-sequences", "3", "--seq-len", "32", "--out", str(out), "--quiet", "--no-report", "--device",
              "cpu"])
    assert exc.value.code == 0
    info = json.loads((out / "prune.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == 2 == info["num_layers_after"]
    ids = depthprobe.make_windows(depthprobe.load_model(str(out))[1], num_sequences=3, seq_len=32,
                                  text_file=text).input_ids
    with torch.no_grad():
        loss = reloaded(input_ids=ids, labels=ids).loss.item()
    assert loss == pytest.approx(info["loss_after"], abs=1e-4)
    curve = pd.read_csv(out / "prune_curve.csv")
    assert set(curve["strategy"]) == {"drop", "greedy", "angular", "block-influence", "block"}
    greedy_rows = curve[curve.strategy == "greedy"].set_index("num_removed")
    assert greedy_rows.loc[2, "loss"] == pytest.approx(info["loss_after"], abs=1e-9)
    # greedy's first step is the best single drop: no strategy beats it at K=1
    assert greedy_rows.loc[1, "loss"] <= curve[curve.num_removed == 1]["loss"].min() + 1e-9
    # prune_excess.csv: each other strategy's curve loss minus greedy's at the same K
    excess = pd.read_csv(out / "prune_excess.csv")
    assert len(excess) == 4 * 3  # 4 strategies x K = 0, 1, 2
    for row in excess.itertuples(index=False):
        mine = curve[(curve.strategy == row.strategy) & (curve.num_removed == row.K)]["loss"].item()
        assert row.excess == pytest.approx(mine - greedy_rows.loc[row.K, "loss"], abs=1e-9)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--remove", "0,1,2,3"], "cannot remove all"),
        (["--remove", "7"], "out of range"),
        (["--remove", "1,1"], "more than once"),
        (["--num-layers", "4"], "between 1 and 3"),
        (["--remove", "1", "--num-layers", "2"], "either --remove"),
        (["--remove", "a,b"], "comma-separated"),
    ],
)
def test_prune_bad_input(args, message, tiny_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prune", str(tiny_dir("llama")), *args, "--seq-len", "16", "--num-sequences", "2",
              "--out", str(tmp_path / "o"), "--quiet", "--no-report"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], err


def test_model_without_removable_blocks():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

    with pytest.raises(depthprobe.DepthprobeError, match="cannot remove blocks"):
        depthprobe.prune.prune(Custom(), None, remove=[1], curve=False, windows=Windows(random_ids(1, 4), "r"))


def test_interrupted_sweep_resumes_without_recomputing(tmp_path, monkeypatch):
    model = build_tiny("llama")
    stack = depthprobe.LayerStack.from_model(model)
    ids = random_ids(6, 16)
    full = run_drop_sweep(stack, ids, batch_size=2, block_sizes=[2], progress=False)
    progress = tmp_path / "drop_progress.jsonl"

    from depthprobe.prune import sweep

    calls = {"n": 0}
    real_run = sweep.BatchScorer.run

    def flaky_run(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 20:  # in the middle of the second batch
            raise KeyboardInterrupt
        return real_run(self, *a, **k)

    monkeypatch.setattr(sweep.BatchScorer, "run", flaky_run)
    with pytest.raises(KeyboardInterrupt):
        run_drop_sweep(stack, ids, batch_size=2, block_sizes=[2], progress_file=progress, progress=False)
    assert len(progress.read_text().splitlines()) == 2  # header + the one finished batch
    calls["n"] = -10_000
    resumed = run_drop_sweep(stack, ids, batch_size=2, block_sizes=[2], progress_file=progress, progress=False)
    per_batch = 4 * 3 + 3  # blocks + sublayers + contiguous runs of 2
    assert calls["n"] == -10_000 + 2 * per_batch  # the finished batch was not recomputed
    np.testing.assert_allclose(resumed.block, full.block, rtol=1e-12)
    np.testing.assert_allclose(resumed.attn, full.attn, rtol=1e-12)
    np.testing.assert_allclose(resumed.runs[2], full.runs[2], rtol=1e-12)
    np.testing.assert_allclose(resumed.run_angles[2], full.run_angles[2], rtol=1e-12)
    # a progress file from another sweep is refused
    with pytest.raises(depthprobe.DepthprobeError, match="different sweep"):
        run_drop_sweep(stack, random_ids(6, 16, seed=1), batch_size=2, block_sizes=[2], progress_file=progress,
                       progress=False)


@pytest.mark.slow
def test_smollm2_drop_matches_naive(smollm2, calibration_file):
    model, tok = smollm2
    windows = depthprobe.make_windows(tok, num_sequences=2, seq_len=128, text_file=calibration_file)
    result = depthprobe.analyze(model, windows=windows, metrics="drop", progress=False,
                                options={"block_sizes": [], "sublayers": False})
    for layer in (0, 14, 29):
        want = naive_objective(model, windows.input_ids, [layer])
        assert result.layers.loc[layer, "drop_delta_loss"] == pytest.approx(want, abs=1e-4)


@pytest.mark.slow
def test_smollm2_pruned_reloads_and_reproduces_loss(tmp_path, smollm2, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "smol-pruned"
    with pytest.raises(SystemExit) as exc:
        main(["prune", "smollm2", "--num-layers", "3", "--strategy", "greedy", "--no-curve", "--num-sequences", "1",
              "--seq-len", "64", "--out", str(out), "--quiet", "--no-report", "--device", "cpu"])
    assert exc.value.code == 0
    info = json.loads((out / "prune.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = depthprobe.make_windows(smollm2[1], num_sequences=1, seq_len=64).input_ids
    with torch.no_grad():
        loss = reloaded(input_ids=ids, labels=ids).loss.item()
    assert reloaded.config.num_hidden_layers == 27
    assert loss == pytest.approx(info["loss_after"], abs=1e-4)
