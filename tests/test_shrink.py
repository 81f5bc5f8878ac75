"""`shrink`: re-measured greedy against naive removal, exact parameter counts, the export's
fresh-process round trip (loss, KV-cache generation, absent weights), baselines, errors, resume."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from torch import nn

import depthprobe
from depthprobe.cli import main
from depthprobe.config import ProbeConfig, RunOptions
from depthprobe.data import Windows
from depthprobe.prune import search
from depthprobe.prune.search import candidate_losses, rank
from depthprobe.prune.shrink import ShrinkConfig, shrink
from depthprobe.prune.units import ShrinkState, Unit
from tests import reference as ref
from tests.tiny_models import build_tiny, random_ids

#: what a sublayer's weights are in a Llama block (the naive side knows the family by hand)
LLAMA_SUBLAYER = {"attn": ("input_layernorm", "self_attn"), "mlp": ("post_attention_layernorm", "mlp")}
WRITER = {"attn": "self_attn.o_proj", "mlp": "mlp.down_proj"}


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def naive_loss(model, ids, removed_blocks=(), zeroed=()):
    """Mean over windows of each window's mean NLL of a deep copy with blocks deleted and the
    sublayers' stream writers' weights set to zero (no hook, no cache): the plain way."""
    twin = copy.deepcopy(model)
    for layer, kind in zeroed:
        nn.init.zeros_(twin.model.layers[layer].get_submodule(WRITER[kind]).weight)
    keep = [i for i in range(len(twin.model.layers)) if i not in set(removed_blocks)]
    twin.model.layers = nn.ModuleList([twin.model.layers[i] for i in keep])
    twin.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        twin.config.layer_types = [model.config.layer_types[i] for i in keep]
    with torch.no_grad():
        logits = twin(input_ids=ids, use_cache=False).logits
    return float(np.mean([ref.lm_loss(logits[w: w + 1], ids[w: w + 1]) for w in range(len(ids))]))


def test_every_candidate_is_remeasured_like_naive_removal():
    model = build_tiny("llama")
    ids = random_ids(4, 16)
    state = ShrinkState(model)
    state.remove(Unit("mlp", 1))  # the second step: damage measured on the model without mlp:1
    base, losses = candidate_losses(state, Windows(ids, "r"), batch_size=2)
    assert base == pytest.approx(naive_loss(model_full := build_tiny("llama"), ids, zeroed=[(1, "mlp")]), abs=1e-5)
    assert Unit("mlp", 1) not in losses and len(losses) == 4 + 4 + 3
    for unit, loss in losses.items():
        blocks = [unit.layer] if unit.kind == "block" else []
        zeroed = [(1, "mlp")] + ([(unit.layer, unit.kind)] if unit.kind != "block" else [])
        assert loss == pytest.approx(naive_loss(model_full, ids, blocks, zeroed), abs=1e-5), unit
    # parameters by hand: the sublayer's own modules; a block less what is already gone
    block = model_full.model.layers[2]
    by_hand = {kind: sum(p.numel() for m in mods for p in block.get_submodule(m).parameters())
               for kind, mods in LLAMA_SUBLAYER.items()}
    assert state.unit_params(Unit("attn", 2)) == by_hand["attn"]
    assert state.unit_params(Unit("mlp", 2)) == by_hand["mlp"]
    assert state.unit_params(Unit("block", 1)) == by_hand["attn"]  # its MLP is gone already
    best = min(losses, key=lambda u: ((losses[u] - base) / state.unit_params(u), u))
    assert rank(state, base, losses)[0][1] == best


def test_parameters_count_only_weights_gone_and_tied_once():
    model = build_tiny("llama", tie_word_embeddings=True)
    model.tie_weights()
    unique = {id(p): p.numel() for p in model.parameters()}
    state = ShrinkState(model)
    assert state.params_before == sum(unique.values())
    attn = state.unit_params(Unit("attn", 0))
    state.remove(Unit("attn", 0))
    state.remove(Unit("mlp", 0))  # block 0 is now empty: it goes with this step
    assert [u.name for u in state.removed] == ["attn:0", "mlp:0", "block:0"]
    assert state.kept == [1, 2, 3] and model.config.num_hidden_layers == 3
    block = sum(p.numel() for p in build_tiny("llama").model.layers[0].parameters())
    assert state.params == state.params_before - block and attn < block


RELOAD = r"""
import json, sys, torch
import depthprobe
from transformers import AutoModelForCausalLM
out = {}
for folder in sys.argv[2:]:
    ids = torch.tensor(json.load(open(sys.argv[1])))
    m = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = m(input_ids=ids, use_cache=False).logits
        gen = m.generate(ids[:1, :8], max_new_tokens=32, min_new_tokens=32, do_sample=False, use_cache=True)
    out[folder] = {"logits": logits.sum().item(), "generated": gen[0, 8:].tolist(), "class": type(m).__name__,
                   "params": sum(p.numel() for p in m.parameters()), "layers": m.config.num_hidden_layers}
print(json.dumps(out))
"""


def test_removed_sublayers_and_blocks_export_and_reload_in_a_fresh_process(tmp_path):
    ids = random_ids(2, 16)
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    expected, folders = {}, []
    for family in ("llama", "gemma2", "qwen2"):
        model = build_tiny(family)
        state = ShrinkState(model)
        for unit in (Unit("attn", 0), Unit("block", 1), Unit("mlp", 3), Unit("attn", 2)):
            state.remove(unit)
        folder = tmp_path / family
        model.save_pretrained(folder)
        folders.append(str(folder))
        with torch.no_grad():
            gen = model.generate(ids[:1, :8], max_new_tokens=32, min_new_tokens=32, do_sample=False, use_cache=True)
            nocache = model.generate(ids[:1, :8], max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                     use_cache=False)
        assert torch.equal(gen, nocache), family  # the KV cache (layer 0's attention gone) agrees
        expected[str(folder)] = (model(input_ids=ids, use_cache=False).logits.sum().item(), gen[0, 8:].tolist(),
                                 state.params)
        with safe_open(folder / "model.safetensors", "pt") as f:
            keys = list(f.keys())
        assert not [k for k in keys if k.startswith(("model.layers.0.self_attn", "model.layers.0.input_layernorm",
                                                     "model.layers.2.mlp", "model.layers.1.self_attn."))]
        assert any(k.startswith("model.layers.0.mlp") for k in keys)
        assert json.loads((folder / "config.json").read_text())["model_type"] == "depthprobe_shrunk"
    done = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "ids.json"), *folders], capture_output=True,
                          text=True, check=True)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    for folder, (logits, generated, params) in expected.items():
        assert got[folder]["logits"] == pytest.approx(logits, rel=1e-5, abs=1e-4)
        assert got[folder]["generated"] == generated
        assert got[folder]["params"] == params and got[folder]["layers"] == 3


def _tiny(tiny_dir, family="llama"):
    return depthprobe.load_model(str(tiny_dir(family)), dtype="float32", device="cpu")


def test_shrink_reaches_the_target_and_writes_the_curve(tiny_dir, tmp_path):
    model, tok = _tiny(tiny_dir)
    config = ShrinkConfig(target_params=0.7, heldout_windows=3, probe=ProbeConfig(num_sequences=2, seq_len=16,
                                                                                    batch_size=2))
    r = shrink(model, tok, config, out_dir=tmp_path / "out", run=RunOptions(progress=False))
    assert r.params_after <= 0.7 * r.params_before and r.stopped == "target"
    assert r.params_after == sum(p.numel() for p in model.parameters())
    # one step less would not have reached the target
    assert r.steps[-2].params > 0.7 * r.params_before if len(r.steps) > 1 else True
    curve = pd.read_csv(tmp_path / "out" / "shrink_curve.csv")
    assert set(curve["strategy"]) == {"shrink", "greedy-blocks", "block", "block-influence", "last-blocks"}
    for column in ("strategy", "step", "unit", "removed", "loss", "heldout_loss", "params", "params_fraction",
                   "prefill_tokens_per_s", "decode_tokens_per_s"):
        assert column in curve
    block = sum(p.numel() for p in build_tiny("llama").model.layers[0].parameters())
    last = curve[curve.strategy == "last-blocks"].set_index("step")
    assert last.loc[1, "removed"] == "block:3" and last.loc[2, "removed"] == "block:2;block:3"
    assert last.loc[2, "params"] == r.params_before - 2 * block
    # the held-out check of every step is the model after it, scored again here independently
    windows = depthprobe.make_windows(tok, num_sequences=2, seq_len=16)
    assert r.loss_after == pytest.approx(float(np.mean([ref.lm_loss(model(input_ids=windows.input_ids[w: w + 1])
                                                                    .logits.detach(), windows.input_ids[w: w + 1])
                                                        for w in range(2)])), abs=1e-5)
    shrunk_rows = curve[curve.strategy == "shrink"]
    assert shrunk_rows["heldout_loss"].iloc[-1] == pytest.approx(r.heldout_after[0], abs=1e-6)
    summary = json.loads((tmp_path / "out" / "shrink.json").read_text())
    assert summary["params_after"] == r.params_after and summary["export"]["format"] in ("plain", "depthprobe_shrunk")
    best = r.block_only  # per baseline: the fewest parameters still >= the shrink's
    blocks_only = curve[curve.strategy.isin(["greedy-blocks", "block", "block-influence", "last-blocks"])
                        & (curve.step > 0)]
    rows = blocks_only[blocks_only.params >= r.params_after]
    assert best["params"] >= r.params_after and best["params"] == rows["params"].min()
    assert best["heldout_loss"] == pytest.approx(rows[rows.params == rows.params.min()]["heldout_loss"].min())
    reach = blocks_only[blocks_only.params <= int(0.7 * r.params_before)]
    at = r.block_only_at_target
    assert at["params"] == reach["params"].max()
    assert at["heldout_loss"] == pytest.approx(reach[reach.params == reach.params.max()]["heldout_loss"].min())
    assert summary["target_params"] == int(0.7 * r.params_before)
    assert summary["heldout_at_or_below_block_only_at_target"] == (summary["heldout_loss_after"] <= at["heldout_loss"])
    assert summary["heldout_at_or_below_block_only"] == (summary["heldout_loss_after"] <= best["heldout_loss"])
    # the last step reached the target with the least damage of the units that reach it
    twin, _ = _tiny(tiny_dir)
    state = ShrinkState(twin)
    for step in r.steps[:-1]:
        state.remove(Unit.parse(step.unit))
    base, losses = candidate_losses(state, windows, batch_size=2)
    reaching = {u: v for u, v in losses.items() if state.params - state.unit_params(u) <= 0.7 * r.params_before}
    assert r.steps[-1].unit == min(reaching, key=lambda u: (reaching[u], u)).name


def _final_sets(removed: list[str]) -> tuple[list[int], list[tuple[int, str]]]:
    """Blocks gone and sublayers gone (original numbering) after removing ``removed`` in order."""
    units = [Unit.parse(u) for u in removed]
    blocks = {u.layer for u in units if u.kind == "block"}
    return sorted(blocks), [(u.layer, u.kind) for u in units if u.kind != "block" and u.layer not in blocks]


def test_two_starts_keep_the_lower_calibration_loss_and_the_model_is_the_chosen_one(tiny_dir, monkeypatch):
    config = ShrinkConfig(target_params=0.55, heldout_windows=3, probe=ProbeConfig(num_sequences=2, seq_len=16,
                                                                                     batch_size=2))
    model, tok = _tiny(tiny_dir)
    r = shrink(model, tok, config, run=RunOptions(progress=False))
    target = int(0.55 * r.params_before)
    assert [s["start"] for s in r.starts] == ["full model", "greedy-blocks"]
    greedy = r.curve[r.curve.strategy == "greedy-blocks"].set_index("step")
    k_star = int(greedy[(greedy.params <= target) & (greedy.index > 0)].index.min())
    assert k_star >= 2
    full, block = r.starts
    # the block start is the block-only greedy's first K* - 1 blocks in its order, then the unit search
    assert block["seed"] == [greedy.loc[k, "unit"] for k in range(1, k_star)] == block["removed"][:k_star - 1]
    assert full["seed"] == []
    ids = depthprobe.make_windows(tok, num_sequences=2, seq_len=16).input_ids
    for start in r.starts:  # each start's calibration loss, by the plain route on a fresh model
        blocks, zeroed = _final_sets(start["removed"])
        assert start["loss"] == pytest.approx(naive_loss(_tiny(tiny_dir)[0], ids, blocks, zeroed), abs=1e-5)
        assert start["params"] <= target and start["stopped"] == "target"
    chosen = min(r.starts, key=lambda s: s["loss"])
    assert [s.unit for s in r.steps] == chosen["removed"] and r.loss_after == pytest.approx(chosen["loss"], abs=1e-5)
    assert r.params_after == chosen["params"] == sum(p.numel() for p in model.parameters())
    # the block start's last step could take the block-only greedy's K*-th block: never worse than it
    assert block["loss"] <= greedy.loc[k_star, "loss"] + 1e-6 and r.loss_after <= greedy.loc[k_star, "loss"] + 1e-6
    # where no copy fits, the full-model start runs in place: the same search as that start
    monkeypatch.setattr("depthprobe.prune.shrink.copies_fit", lambda m: False)
    model, tok = _tiny(tiny_dir)
    alone = shrink(model, tok, config, run=RunOptions(progress=False))
    assert alone.starts == [] and [s.unit for s in alone.steps] == full["removed"]
    assert alone.loss_after == pytest.approx(full["loss"], abs=1e-6)


def _interrupt_then_resume(tiny_dir, config, out, monkeypatch, die_at: int):
    """Shrink into ``out`` killed at the ``die_at``-th measured step, then ``--resume``d; the
    resumed result and one entry per step the resumed run measured."""
    real, calls = search._next_step, []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == die_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(search, "_next_step", dies)
    model, tok = _tiny(tiny_dir)
    with pytest.raises(KeyboardInterrupt):
        shrink(model, tok, config, out_dir=out, run=RunOptions(progress=False))
    calls.clear()
    monkeypatch.setattr(search, "_next_step", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    model, tok = _tiny(tiny_dir)
    return shrink(model, tok, config, out_dir=out, run=RunOptions(progress=False, resume=True)), calls


def test_interrupted_shrink_resumes_from_its_journal(tiny_dir, tmp_path, monkeypatch):
    config = ShrinkConfig(target_params=0.6, baselines=False, heldout_windows=2,
                          probe=ProbeConfig(num_sequences=2, seq_len=16, batch_size=2))
    model, tok = _tiny(tiny_dir)
    plain = shrink(model, tok, config, run=RunOptions(progress=False))
    assert len(plain.steps) >= 3
    resumed, calls = _interrupt_then_resume(tiny_dir, config, tmp_path / "o", monkeypatch, die_at=3)
    assert resumed.removed == plain.removed and resumed.loss_after == pytest.approx(plain.loss_after, abs=1e-9)
    assert len(calls) == len(plain.steps) - 2  # the two journaled steps were replayed, not measured
    assert not (tmp_path / "o" / "shrink_progress.jsonl").exists()


def test_shrink_interrupted_in_its_second_start_replays_the_first(tiny_dir, tmp_path, monkeypatch):
    config = ShrinkConfig(target_params=0.55, heldout_windows=2, probe=ProbeConfig(num_sequences=2, seq_len=16,
                                                                                     batch_size=2))
    model, tok = _tiny(tiny_dir)
    plain = shrink(model, tok, config, run=RunOptions(progress=False))
    full, block = plain.starts
    resumed, calls = _interrupt_then_resume(tiny_dir, config, tmp_path / "o", monkeypatch,
                                            die_at=len(full["removed"]) + 1)  # the second start's first step
    assert resumed.removed == plain.removed and resumed.starts == plain.starts
    assert len(calls) == len(block["removed"]) - len(block["seed"])  # the first start came from its journal


@pytest.mark.parametrize("args, message", [
    (["--target-params", "0.8", "--target-speedup", "1.5"], "one target"),
    ([], "give a target"),
    (["--target-params", "1.5"], "between 0 and 1"),
    (["--target-params", "0.05"], "would remove every block"),
    (["--target-speedup", "1.5", "--device-map", "auto"], "cannot be measured"),
    (["--target-params", "0.8", "--units", "heads"], "--units"),
])
def test_shrink_bad_input_is_one_line(args, message, tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(["shrink", str(tiny_dir("llama")), "--out", str(out), "--num-sequences", "2",
                            "--seq-len", "16", "--quiet", *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (out / "shrink_progress.jsonl").exists()


def test_unreachable_speedup_keeps_the_finished_steps(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(["shrink", str(tiny_dir("llama")), "--out", str(out), "--num-sequences", "2",
                            "--seq-len", "16", "--heldout-windows", "2", "--quiet", "--no-baselines",
                            "--target-speedup", "1000", "--device", "cpu"], capsys)
    assert code == 2 and "unreachable" in err and len(err.strip().splitlines()) == 1
    journal = (out / "shrink_progress.jsonl").read_text().splitlines()
    assert len(journal) > 2  # header + the finished steps, for a --resume with a lower target


def test_cli_shrink_prints_the_loss_the_export_gives(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(["shrink", str(tiny_dir("gemma2")), "--out", str(out), "--num-sequences", "2",
                                 "--seq-len", "16", "--heldout-windows", "2", "--quiet", "--target-params", "0.6",
                                 "--device", "cpu", "--remeasure", "all"], capsys)
    assert code == 0, err
    summary = json.loads((out / "shrink.json").read_text())
    assert summary["search"].startswith("greedy, every candidate re-measured at every step")
    assert [s["start"] for s in summary["starts"]] == ["full model", "greedy-blocks"]
    printed = float(stdout.split("loss ", 1)[1].split("->")[1].split()[0])
    model, tok = depthprobe.load_model(str(out), dtype="float32", device="cpu")
    ids = depthprobe.make_windows(tok, num_sequences=2, seq_len=16).input_ids
    with torch.no_grad():
        loss = np.mean([ref.lm_loss(model(input_ids=ids[w: w + 1]).logits, ids[w: w + 1]) for w in range(2)])
    assert loss == pytest.approx(printed, abs=1e-4)
    report = (out / "report.html").read_text()
    assert "Why each unit was removed" in report and "Where the search started" in report
    code, _, err = run_cli(["shrink", str(tiny_dir("gemma2")), "--out", str(out), "--num-sequences", "2",
                            "--seq-len", "8", "--quiet", "--target-params", "0.5", "--resume"], capsys)
    assert code == 2 and "--seq-len 8 (was 16)" in err and len(err.strip().splitlines()) == 1


SMOL_RELOAD = r"""
import json, sys, torch
import depthprobe
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor(json.load(open(sys.argv[2])))
with torch.no_grad():
    nll = [torch.nn.functional.cross_entropy(m(input_ids=ids[w:w+1]).logits[0, :-1], ids[w, 1:]).item()
           for w in range(len(ids))]
    gen = m.generate(ids[:1, :16], max_new_tokens=32, min_new_tokens=32, do_sample=False, use_cache=True)
print(json.dumps({"loss": sum(nll) / len(nll), "generated": gen[0, 16:].tolist(),
                  "params": sum(p.numel() for p in m.parameters())}))
"""


@pytest.mark.slow
def test_smollm2_shrunk_export_reloads_with_the_printed_loss_and_same_generation(tmp_path):
    model, tok = depthprobe.load_model("smollm2", dtype="float32", device="cpu")  # not the shared fixture: shrunk
    config = ShrinkConfig(target_params=0.985, baselines=False, heldout_windows=2,
                          probe=ProbeConfig(num_sequences=1, seq_len=32, batch_size=1))
    r = shrink(model, tok, config, out_dir=tmp_path / "out", run=RunOptions(progress=False))
    assert any(u.startswith(("attn:", "mlp:")) for u in r.removed) and r.export["format"] == "depthprobe_shrunk"
    ids = depthprobe.make_windows(tok, num_sequences=1, seq_len=32).input_ids
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    with torch.no_grad():
        gen = model.generate(ids[:1, :16], max_new_tokens=32, min_new_tokens=32, do_sample=False, use_cache=True)
    done = subprocess.run([sys.executable, "-c", SMOL_RELOAD, str(tmp_path / "out"), str(tmp_path / "ids.json")],
                          capture_output=True, text=True, check=True)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["loss"] == pytest.approx(r.loss_after, abs=1e-4)
    assert got["generated"] == gen[0, 16:].tolist()
    assert got["params"] == r.params_after == json.loads((tmp_path / "out" / "shrink.json").read_text())["params_after"]


def test_lazy_greedy_remeasures_the_leading_candidates_with_the_same_sweep():
    model = build_tiny("llama")
    ids = Windows(random_ids(4, 16), "r")
    state = ShrinkState(model)
    base, every = candidate_losses(state, ids, batch_size=2)
    leading = [Unit("attn", 3), Unit("block", 0), Unit("mlp", 2)]
    base_only, some = candidate_losses(state, ids, batch_size=2, only=leading)
    assert base_only == pytest.approx(base, abs=1e-9) and set(some) == set(leading)
    for unit in leading:
        assert some[unit] == pytest.approx(every[unit], abs=1e-9)
    # the whole search: exact greedy == lazy greedy that re-measures every candidate
    def run(remeasure):
        return search.greedy_shrink(ShrinkState(build_tiny("llama")), ids, None, stop=lambda s: len(s.removed) >= 4,
                                    options=search.SearchOptions(batch_size=2, remeasure=remeasure), progress=False)[0]

    exact, lazy = run(None), run(100)
    assert [s.unit for s in exact] == [s.unit for s in lazy]
    two = run(2)
    assert two[0].unit == exact[0].unit  # step 1 is a full sweep either way


def test_max_loss_increase_stops_before_the_held_out_loss_rises_more(tiny_dir):
    model, tok = _tiny(tiny_dir)
    config = ShrinkConfig(max_loss_increase=0.004, baselines=False, heldout_windows=3,
                          probe=ProbeConfig(num_sequences=2, seq_len=16, batch_size=2))
    r = shrink(model, tok, config, run=RunOptions(progress=False))
    full = r.heldout_before[0]
    assert all(s.heldout_loss - full <= 0.004 for s in r.steps)
    if r.stopped == "max_loss_increase":  # the step it refused: measured on a copy, it rises more
        twin, _ = _tiny(tiny_dir)
        state = ShrinkState(twin)
        for unit in r.removed:
            if state.has(Unit.parse(unit)):
                state.remove(Unit.parse(unit))
        held = depthprobe.data.heldout_windows(tok, num_sequences=3, seq_len=16,
                                               calibration=depthprobe.make_windows(tok, num_sequences=2, seq_len=16))
        base, losses = candidate_losses(state, depthprobe.make_windows(tok, num_sequences=2, seq_len=16), 2)
        refused = rank(state, base, losses)[0][1]
        assert state.scores_without(refused, held, 2).mean() - full > 0.004
    assert r.heldout_after[0] - full <= 0.004


def test_check_calibration_reports_the_overlap(tiny_dir, tmp_path, capsys, calibration_file):
    other = tmp_path / "other.txt"
    other.write_text(" ".join(reversed(open(calibration_file).read().split()))[:20000])
    out = tmp_path / "out"
    code, stdout, err = run_cli(["shrink", str(tiny_dir("llama")), "--out", str(out), "--num-sequences", "2",
                                 "--seq-len", "16", "--heldout-windows", "2", "--quiet", "--target-params", "0.7",
                                 "--no-baselines", "--check-calibration", str(other), "--device", "cpu"], capsys)
    assert code == 0, err
    check = json.loads((out / "shrink.json").read_text())["calibration_check"]
    first, second = set(check["units_first"]), set(check["units_second"])
    assert check["shared"] == len(first & second)
    assert check["jaccard"] == pytest.approx(len(first & second) / len(first | second))
    assert check["units_first"] == json.loads((out / "shrink.json").read_text())["removed"]
    assert "calibration check" in stdout


def test_speedup_target_stops_on_a_measured_speed(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(["shrink", str(tiny_dir("llama")), "--out", str(out), "--num-sequences", "2",
                                 "--seq-len", "16", "--heldout-windows", "2", "--quiet", "--no-baselines",
                                 "--no-report", "--target-speedup", "1.05", "--device", "cpu"], capsys)
    if code == 2:  # the shared machine's timings never reached the target: refused, steps kept
        assert "unreachable" in err and (out / "shrink_progress.jsonl").is_file()
        return
    speed = json.loads((out / "shrink.json").read_text())["speed"]
    curve = pd.read_csv(out / "shrink_curve.csv")
    rows = curve[curve.strategy == "shrink"].set_index("step")["decode_tokens_per_s"]
    assert rows.loc[0] == pytest.approx(speed["original_tokens_per_s"])
    assert rows.iloc[-1] / rows.loc[0] >= 1.05  # the search stopped on a measurement, not an estimate
    assert speed["measured_on"] == "the exported folder, reloaded" and speed["speedup"] == pytest.approx(
        speed["shrunk_tokens_per_s"] / speed["original_tokens_per_s"])
