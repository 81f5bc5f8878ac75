"""Layer-major execution (every window passes block l before block l+1): the same numbers as
the batch-major run, each offloaded block's weights read once per sweep, streams spilled to
a memory-mapped file over the budget."""

from __future__ import annotations

import collections
import re

import numpy as np
import pytest
import torch
from accelerate.utils.offload import OffloadedWeightsLoader

import depthprobe
from depthprobe.data import Windows
from depthprobe.model.stack import LayerStack
from depthprobe.probes.drop import run_drop_sweep, run_drop_sweep_layer_major
from depthprobe.probes.layer_major import StateStore, is_offloaded, run_main_pass_layer_major
from depthprobe.probes.main_pass import run_main_pass
from depthprobe.probes.runner import BlockRunner
from depthprobe.probes.store import StreamCheckpoints
from depthprobe.probes.sweep import ExecutionOptions
from tests.tiny_models import build_tiny, random_ids, save_tiny

METRICS = "angular,variance,lens,drop"


def assert_same(got, ref, tol=1e-5):
    """Every column, table, matrix and the base loss of two analyze results agree (mid-state
    columns of an offloaded run are empty, with a note: finding them needs another read)."""
    assert list(got.layers.columns) == list(ref.layers.columns)
    offloaded_mids = any("not computed on offloaded weights" in n for n in got.summary["notes"])
    for column in ref.layers.columns:
        if offloaded_mids and column.endswith("_mid"):
            assert got.layers[column].isna().all(), column
            continue
        np.testing.assert_allclose(got.layers[column], ref.layers[column], rtol=tol, atol=tol, err_msg=column)
    assert set(got.tables) == set(ref.tables)
    for name, table in ref.tables.items():
        for column in table.columns:
            if table[column].dtype.kind in "fiub":
                np.testing.assert_allclose(got.tables[name][column], table[column], rtol=tol, atol=tol,
                                           err_msg=f"{name}.{column}")
    np.testing.assert_allclose(got.angular_distance.to_numpy(float), ref.angular_distance.to_numpy(float),
                               rtol=tol, atol=tol)
    for key in ("base_loss", "drop_base_loss"):
        if ref.summary.get(key) is not None:
            assert got.summary[key] == pytest.approx(ref.summary[key], rel=tol, abs=tol)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_layer_major_equals_batch_major(family):
    torch.manual_seed(0)
    model = build_tiny(family).eval()
    windows = Windows(random_ids(3, 10), "random ids")  # 3 windows in batches of 2: a short last batch
    runs = {order: depthprobe.analyze(model, windows=windows, metrics=METRICS, batch_size=2, progress=False,
                                      options={"execution": order, "block_sizes": (2,), "bootstrap_samples": 50})
            for order in ("batch", "layer")}
    assert not is_offloaded(model)
    assert "drop_delta_loss_attn" in runs["layer"].layers and "block_drop" in runs["layer"].tables
    assert_same(runs["layer"], runs["batch"])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_block_by_block_backward_equals_the_models_own(family):
    """grad layer-major (each block re-run on its stored inputs, backward from dL/dx_{l+1})
    equals one backward through the whole model, over several batches (a short last one)."""
    torch.manual_seed(0)
    model = build_tiny(family).eval()
    windows = Windows(random_ids(3, 10), "random ids")
    runs = {order: depthprobe.analyze(model, windows=windows, metrics="angular,grad", batch_size=2, progress=False,
                                      options={"execution": order}) for order in ("batch", "layer")}
    assert list(runs["layer"].layers.columns) == list(runs["batch"].layers.columns)
    for column in ("grad_norm", "grad_norm_attn", "grad_norm_mlp"):
        np.testing.assert_allclose(runs["layer"].layers[column], runs["batch"].layers[column], rtol=1e-6,
                                   err_msg=column)
    # and the model's own gradients, by hand: the norm of each block's summed gradient
    model.zero_grad()
    for batch in windows.batches(2):
        out = model(input_ids=batch, labels=batch)
        (out.loss * batch.shape[0] / windows.num_sequences).backward()  # equal-length windows: mean over all
    blocks = LayerStack.from_model(model).blocks
    want = [float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in block.parameters()))) for block in blocks]
    np.testing.assert_allclose(runs["layer"].layers["grad_norm"], want, rtol=1e-5)
    assert all(p.grad is None or p.requires_grad for p in model.parameters())


def test_blocks_sharing_parameters_keep_the_models_own_backward():
    """A parameter in two blocks gets gradient from both: the block-by-block backward would see
    one share, so analyze falls back to the model's own backward (same numbers either way)."""
    from depthprobe.probes.layer_major import supports_block_backward

    torch.manual_seed(0)
    model = build_tiny("llama").eval()
    model.model.layers[1].mlp = model.model.layers[0].mlp
    stack = LayerStack.from_model(model)
    assert not supports_block_backward(stack) and supports_block_backward(LayerStack.from_model(build_tiny("llama")))
    windows = Windows(random_ids(2, 8), "random ids")
    runs = {order: depthprobe.analyze(model, windows=windows, metrics="grad", batch_size=2, progress=False,
                                      options={"execution": order}).layers for order in ("batch", "layer")}
    np.testing.assert_allclose(runs["layer"]["grad_norm"], runs["batch"]["grad_norm"], rtol=1e-12)


def test_layer_major_spills_streams_to_a_memory_mapped_file(monkeypatch):
    model = build_tiny("llama").eval()
    stack, ids = LayerStack.from_model(model), random_ids(4, 16)
    stores = []
    original = StateStore.__init__

    def remember(self, *args, **kwargs):
        original(self, *args, **kwargs)
        stores.append(self)

    monkeypatch.setattr(StateStore, "__init__", remember)
    kwargs = {"batch_size": 3, "sublayers": True, "block_sizes": [2]}
    spilled = run_drop_sweep_layer_major(stack, ids, budget=0, progress=False, **kwargs)
    in_ram = run_drop_sweep_layer_major(stack, ids, budget=10**9, progress=False, **kwargs)
    assert stores[0].spilled and not stores[1].spilled
    assert not stores[0].path.exists()  # removed when the sweep ends
    ref = run_drop_sweep(stack, ids, progress=False, **kwargs)
    for got in (spilled, in_ram):
        for name in ("base", "block", "attn", "mlp"):
            np.testing.assert_allclose(getattr(got, name), getattr(ref, name), rtol=1e-6, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(got.runs[2], ref.runs[2], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got.run_angles[2], ref.run_angles[2], rtol=1e-6, atol=1e-6)
    # the main pass too: x_0..x_L of all windows in the file
    windows = Windows(ids, "random ids")
    main = run_main_pass_layer_major(stack, windows, ("angular", "variance", "lens"), batch_size=3, loss=True,
                                     progress=False, budget=0)
    assert stores[-1].spilled
    want = run_main_pass(stack, windows, ("angular", "variance", "lens"), batch_size=3, loss=True, progress=False)
    for column, values in want.columns.items():
        np.testing.assert_allclose(main.columns[column], values, rtol=1e-6, atol=1e-6, err_msg=column)
    np.testing.assert_allclose(main.window_nll, want.window_nll, rtol=1e-6)


# ---------------------------------------------------------------------------- offloaded to disk
@pytest.fixture(scope="module")
def offload_pair(tmp_path_factory):
    folder = save_tiny("llama", tmp_path_factory.mktemp("llama-lm"), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=6)
    in_memory, _ = depthprobe.load_model(folder, device="cpu", dtype="float32")
    offloaded, _ = depthprobe.load_model(folder, dtype="float32", max_memory="cpu:300KB",
                                         offload_folder=folder / "offload")
    return in_memory, offloaded


@pytest.fixture
def weight_reads(monkeypatch):
    """Counts of reads of every offloaded tensor (by full name) from accelerate's weights map."""
    counts: collections.Counter = collections.Counter()
    original = OffloadedWeightsLoader.__getitem__

    def counting(self, key):
        counts[key] += 1
        return original(self, key)

    monkeypatch.setattr(OffloadedWeightsLoader, "__getitem__", counting)
    return counts


def block_reads(counts: collections.Counter) -> dict[int, list[int]]:
    """block -> read counts of its offloaded tensors."""
    found: dict[int, list[int]] = collections.defaultdict(list)
    for key, n in counts.items():
        match = re.match(r"model\.layers\.(\d+)\.", key)
        if match:
            found[int(match.group(1))].append(n)
    return dict(found)


def test_offloaded_drop_sweep_reads_each_block_once(offload_pair, weight_reads):
    in_memory, offloaded = offload_pair
    assert is_offloaded(offloaded)
    stack, ids = LayerStack.from_model(offloaded), random_ids(3, 12)
    kwargs = {"batch_size": 2, "sublayers": True, "block_sizes": [2, 4], "progress": False}
    got = run_drop_sweep_layer_major(stack, ids, **kwargs)
    reads = block_reads(weight_reads)
    assert len(reads) >= 4  # most blocks live on disk
    assert all(n == 1 for counts in reads.values() for n in counts), reads
    assert all(n == 1 for n in weight_reads.values())  # the head and final norm too
    weight_reads.clear()
    ref = run_drop_sweep(LayerStack.from_model(in_memory), ids, **kwargs)
    for name in ("base", "block", "attn", "mlp"):
        np.testing.assert_allclose(getattr(got, name), getattr(ref, name), rtol=1e-5, atol=1e-6, err_msg=name)
    for n in (2, 4):
        np.testing.assert_allclose(got.runs[n], ref.runs[n], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.run_angles[n], ref.run_angles[n], rtol=1e-5, atol=1e-6)
    # the batch-major sweep on the same offloaded model reads a block at every call (what this avoids)
    run_drop_sweep(stack, ids, batch_size=2, sublayers=False, progress=False)
    assert min(min(c) for c in block_reads(weight_reads).values()) >= 4


def test_offloaded_analyze_is_layer_major_and_equals_in_memory(offload_pair, weight_reads):
    in_memory, offloaded = offload_pair
    windows = Windows(random_ids(3, 12), "random ids")
    options = {"block_sizes": (2,), "bootstrap_samples": 50}
    got = depthprobe.analyze(offloaded, windows=windows, metrics=METRICS, batch_size=2, progress=False,
                             options=options)
    # two sweeps (main pass, drop), each reading every offloaded tensor once
    assert set(weight_reads.values()) == {2}
    ref = depthprobe.analyze(in_memory, windows=windows, metrics=METRICS, batch_size=2, progress=False,
                             options=options)
    assert_same(got, ref)
    with torch.no_grad():
        own = in_memory(input_ids=windows.input_ids, labels=windows.input_ids).loss
    assert got.summary["base_loss"] == pytest.approx(float(own), rel=1e-5)


def test_offloaded_gradients_equal_in_memory_reading_each_block_once_more(offload_pair, weight_reads):
    """grad on offloaded weights: the backward runs block by block, each block read once more
    (forward, backward, drop sweep: 3 reads; the rest 2), numbers equal the in-memory run."""
    in_memory, offloaded = offload_pair
    windows = Windows(random_ids(3, 12), "random ids")
    metrics = "angular,variance,grad,drop"
    options = {"block_sizes": (), "bootstrap_samples": 50}
    got = depthprobe.analyze(offloaded, windows=windows, metrics=metrics, batch_size=2, progress=False,
                             options=options)
    reads = block_reads(weight_reads)
    assert len(reads) >= 4 and all(n == 3 for counts in reads.values() for n in counts), reads
    assert {n for key, n in weight_reads.items() if ".layers." not in key} == {2}
    assert all(p.grad is None for p in offloaded.parameters())  # every gradient freed
    ref = depthprobe.analyze(in_memory, windows=windows, metrics=metrics, batch_size=2, progress=False,
                             options=options)
    assert_same(got, ref, tol=1e-6)
    assert got.summary["timings_s"]["grad"] > 0


# ---------------------------------------------------------------------------- resume
def test_layer_major_drop_sweep_resumes_after_the_last_finished_block(tmp_path, monkeypatch):
    """Stopped after block 1, the sweep resumes at block 2 from the checkpointed streams and
    ends with exactly the numbers of an uninterrupted run."""
    stack, ids = LayerStack.from_model(build_tiny("llama").eval()), random_ids(3, 10)
    kwargs = {"batch_size": 2, "sublayers": True, "block_sizes": [2], "progress": False,
              "execution": ExecutionOptions(order="layer")}
    want = run_drop_sweep(stack, ids, **kwargs)
    journal = tmp_path / "drop_progress.jsonl"
    save = StreamCheckpoints.save

    def stop_after_block_1(self, layer, *args):
        save(self, layer, *args)
        if layer == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(StreamCheckpoints, "save", stop_after_block_1)
    with pytest.raises(KeyboardInterrupt):
        run_drop_sweep(stack, ids, progress_file=journal, **kwargs)
    assert sorted(p.name for p in tmp_path.glob("*.bin")) == ["drop_progress.layer0.bin", "drop_progress.layer1.bin"]
    monkeypatch.undo()
    ran, at = [], BlockRunner.at

    def counting(self, layer):
        ran.append(layer)
        return at(self, layer)

    monkeypatch.setattr(BlockRunner, "at", counting)
    got = run_drop_sweep(stack, ids, progress_file=journal, **kwargs)
    assert ran == [2, 3]  # blocks 0 and 1 were not run again
    for name in ("base", "block", "attn", "mlp"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    np.testing.assert_array_equal(got.runs[2], want.runs[2])
    np.testing.assert_array_equal(got.run_angles[2], want.run_angles[2])
    assert not list(tmp_path.glob("*.bin"))  # a finished sweep leaves no checkpoint


# ---------------------------------------------------------------------------- device_map
@pytest.fixture(scope="module")
def first_block_on_disk(tmp_path_factory):
    """The tiny Llama with its embedding, norm and head on the cpu and blocks 0-1 on disk."""
    folder = save_tiny("llama", tmp_path_factory.mktemp("llama-split"), hidden_size=64, intermediate_size=128)
    names = ["model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head", "model.layers.2", "model.layers.3"]
    device_map = {**dict.fromkeys(names, "cpu"), "model.layers.0": "disk", "model.layers.1": "disk"}
    model, _ = depthprobe.load_model(folder, dtype="float32", device_map=device_map, offload_folder=folder / "off")
    return depthprobe.load_model(folder, device="cpu", dtype="float32")[0], model


@pytest.mark.parametrize("split", ["max_memory", "device_map"])
def test_inputs_go_where_the_embedding_runs_under_a_device_map(split, offload_pair, first_block_on_disk):
    """Split over cpu and disk (by ``max_memory``, or with the first blocks on disk, whose
    weights then sit on ``meta``): the held-out scorer and repair's captures place inputs on
    the embedding's execution device and give the in-memory model's numbers."""
    from depthprobe.evaluate.heldout import per_window_loss
    from depthprobe.probes.metrics import per_sequence_nll
    from depthprobe.prune.repair import _run_capturing

    in_memory, split_model = offload_pair if split == "max_memory" else first_block_on_disk
    stack, ids = LayerStack.from_model(split_model), random_ids(3, 12)
    assert is_offloaded(split_model) and {p.device.type for p in split_model.parameters()} == {"cpu", "meta"}
    if split == "device_map":
        assert stack.device.type == "meta"  # where the blocks' first weight is: no place for inputs
    with torch.no_grad():
        want = per_sequence_nll(in_memory(input_ids=ids).logits, ids).numpy()
    np.testing.assert_allclose(per_window_loss(stack, ids, batch_size=2), want, rtol=1e-5)
    np.testing.assert_allclose(per_window_loss(stack, ids, removed=[1], batch_size=2),
                               per_window_loss(LayerStack.from_model(in_memory), ids, removed=[1], batch_size=2),
                               rtol=1e-5)
    block = stack.blocks[2]
    with torch.no_grad():
        got = _run_capturing(stack, ids, {block: "x"}, block)["x"]
        ref = in_memory(input_ids=ids, output_hidden_states=True).hidden_states[3]
    np.testing.assert_allclose(got.numpy(), ref.reshape(-1, ref.shape[-1]).numpy(), rtol=1e-5, atol=1e-6)
