"""Architectures outside the family table: discovery, not-applicable columns, MoE routers,
exports, and the whole causal-LM catalogue of the installed transformers (tests/arch_coverage.py)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import depthprobe
from depthprobe.cli import main as cli_main
from depthprobe.model.families import FAMILIES
from depthprobe.model.stack import LayerStack
from depthprobe.probes import metrics as M
from tests import arch_coverage as cov

# hand-written sublayer parameters of three families the table does not name: which modules
# a reader of the modeling code assigns to each sublayer (norms shared by both are in neither)
HAND_SUBLAYERS = {
    "phi3": {"attn": ("input_layernorm", "self_attn"), "mlp": ("post_attention_layernorm", "mlp")},
    "stablelm": {"attn": ("input_layernorm", "self_attn"), "mlp": ("post_attention_layernorm", "mlp")},
    # Falcon's default block is parallel: one input_layernorm feeds both sublayers
    "falcon": {"attn": ("self_attention",), "mlp": ("mlp",)},
}


def _mean_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over every window (equal lengths: the mean of per-window means)."""
    logits = model(input_ids=ids, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("model_type", sorted(HAND_SUBLAYERS))
def test_sublayer_columns_equal_hand_computation(model_type):
    model = cov.build_tiny(model_type)
    windows = cov.calibration_windows()
    result = depthprobe.analyze(model, windows=windows, metrics="grad,drop", progress=False,
                                batch_size=windows.num_sequences, options={"block_sizes": ()})
    ids = windows.input_ids
    base_model = copy.deepcopy(model)
    _mean_loss(base_model, ids).backward()
    with torch.no_grad():
        base = float(_mean_loss(model, ids))
    for layer in range(len(LayerStack.from_model(model))):
        block = base_model.model.layers[layer] if hasattr(base_model, "model") else None
        if block is None:
            block = base_model.transformer.h[layer]
        for kind, names in HAND_SUBLAYERS[model_type].items():
            params = [p for n in names for p in block.get_submodule(n).parameters()]
            want = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))
            assert result.layers[f"grad_norm_{kind}"][layer] == pytest.approx(want, rel=1e-5, abs=1e-8)
            dropped = copy.deepcopy(model)
            core = _layers(dropped)[layer].get_submodule(names[-1])
            core.forward = _zeros_like_output(core.forward)  # the sublayer's output zeroed by hand
            with torch.no_grad():
                want_drop = float(_mean_loss(dropped, ids)) - base
            assert result.layers[f"drop_delta_loss_{kind}"][layer] == pytest.approx(want_drop, abs=1e-5)


def _layers(model):
    return model.model.layers if hasattr(model, "model") else model.transformer.h


def _zeros_like_output(forward):
    def zeroed(*args, **kwargs):
        out = forward(*args, **kwargs)
        if isinstance(out, tuple):
            return (torch.zeros_like(out[0]), *out[1:])
        return torch.zeros_like(out)

    return zeroed


# OPT is left out: its MLP is two bare linears (fc1, fc2) with a functional activation
# between them, which inspection cannot tell from other projections; the table holds it.
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "olmo2", "phi", "gpt2", "gpt_neox"])
def test_discovery_agrees_with_family_table(family):
    """Traced discovery finds the table's sublayers: the same parameters, and zeroing the
    discovered contribution changes the output exactly as zeroing the table's does."""
    from tests.tiny_models import build_tiny, random_ids

    model = build_tiny(family)
    table = LayerStack.from_model(model)
    found = LayerStack.from_model(model)
    found.spec = None  # force inspection
    ids = random_ids(2, 10)
    for layer in range(len(table)):
        for kind in ("attn", "mlp"):
            want = {id(p) for m in table.sublayer_modules(layer, kind) for p in m.parameters()}
            got = {id(p) for m in found.sublayer_modules(layer, kind) for p in m.parameters()}
            assert got == want, f"{family} block {layer} {kind}"
            outs = []
            for stack in (table, found):
                module = stack.sublayer_output_module(layer, kind)
                handle = module.register_forward_hook(lambda m, a, o: torch.zeros_like(o[0] if isinstance(o, tuple) else o)
                                                      if not isinstance(o, tuple) else (torch.zeros_like(o[0]), *o[1:]))
                with torch.no_grad():
                    outs.append(model(input_ids=ids).logits)
                handle.remove()
            torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert set(FAMILIES) >= {family}


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_mamba_attention_columns_not_applicable_exit_0(tmp_path, capsys):
    """A run where a metric does not apply exits 0 and says why in one line."""
    folder = _save(cov.build_tiny("mamba"), tmp_path / "mamba")
    out = tmp_path / "run"
    code, stdout, err = run_cli(["analyze", str(folder), "--metrics", "angular,grad,drop", "--num-sequences", "2",
                                 "--seq-len", "24", "--device", "cpu", "--out", str(out), "--no-report"], capsys)
    assert code in (0, None), err
    lines = [line for line in (stdout + err).splitlines() if "grad_norm_attn: not applicable" in line]
    assert len(lines) == 1 and "no attention sublayer" in lines[0], stdout + err
    result = depthprobe.AnalysisResult.load(out)
    assert result.layers["grad_norm_attn"].isna().all()
    assert np.isfinite(result.layers["grad_norm"]).all()
    assert np.isfinite(result.layers["drop_delta_loss"]).all()


def test_nan_weights_still_fail_with_one_line_and_save(tmp_path, capsys):
    model = cov.build_tiny("phi3")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(math.nan)
    folder = _save(model, tmp_path / "nan")
    out = tmp_path / "run"
    code, _, err = run_cli(["analyze", str(folder), "--metrics", "angular,variance", "--num-sequences", "2",
                            "--seq-len", "24", "--device", "cpu", "--out", str(out), "--no-report"], capsys)
    assert code == 2 and "Traceback" not in err
    error = [line for line in err.splitlines() if line.startswith("Error")]
    assert len(error) == 1 and "layer 1" in error[0] and "NaN" in error[0], err
    assert (out / "layers.csv").is_file()


def test_router_load_entropy_equals_hand_count():
    model = cov.build_tiny("mixtral")
    windows = cov.calibration_windows()
    result = depthprobe.analyze(model, windows=windows, metrics="variance", progress=False,
                                batch_size=windows.num_sequences)
    k, experts = model.config.num_experts_per_tok, model.config.num_local_experts
    captured = {}
    handles = [layer.mlp.gate.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, a[0]))
               for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=windows.input_ids, use_cache=False)
    for h in handles:
        h.remove()
    for layer, x in captured.items():
        gate = model.model.layers[layer].mlp.gate
        logits = x.reshape(-1, x.shape[-1]) @ gate.weight.T
        counts = np.zeros(experts)
        for row in logits:
            for e in torch.topk(row, k).indices.tolist():
                counts[e] += 1
        p = counts / counts.sum()
        want = -sum(q * math.log(q) for q in p if q > 0)
        assert result.layers["router_load_entropy"][layer] == pytest.approx(want, rel=1e-9)
    assert M.load_entropy([5, 5, 5, 5]) == pytest.approx(math.log(4))


@pytest.mark.parametrize("model_type, removed", [("qwen2_moe", 1), ("jamba", 1), ("gemma3", 1), ("deepseek_v3", 1),
                                                ("lfm2", 1), ("diffllama", 1), ("afmoe", 0), ("deepseek_v3", 0),
                                                ("beam", 0), ("gemma4_text", 0), ("gemma4_text", 2)])
def test_export_config_follows_kept_blocks(model_type, removed, tmp_path):
    """Pruned export reloads with plain AutoModelForCausalLM and reproduces the pruned loss
    (DiffLlama: its index-derived lambda_init is folded into the weights of renumbered blocks;
    AFMoE / DeepSeek without their dense block 0: the dense-prefix count follows)."""
    from transformers import AutoModelForCausalLM

    from depthprobe.prune.export import remove_blocks, save_model

    try:
        model = cov.build_tiny(model_type)
    except cov.Unsupported as exc:
        pytest.skip(str(exc))
    stack = LayerStack.from_model(model)
    ids = cov.calibration_windows().input_ids
    with torch.no_grad(), stack.keep_blocks([i for i in range(3) if i != removed]):
        want = float(_mean_loss(model, ids))
    try:
        remove_blocks(stack, [removed])
    except depthprobe.DepthprobeError as exc:
        assert "cannot" in str(exc)
        return
    save_model(model, cov.tokenizer(), tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert float(_mean_loss(reloaded, ids)) == pytest.approx(want, rel=1e-5)
    assert reloaded.config.get_text_config().num_hidden_layers == 2


def _save(model, folder):
    model.save_pretrained(folder)
    cov.tokenizer().save_pretrained(folder)
    return folder


#: the architectures (of what transformers builds tiny) that do not pass, with why: each a one-line
#: refusal, never a traceback (docs/coverage.md). Any other failure fails the test.
KNOWN_FAILURES = {
    "xlm": "keeps each block's parts in parallel lists (attentions, ffns, ...), not one module per block",
}
#: the catalogue in shards, so the two test workers share it (one test was the suite's longest)
COVERAGE_SHARDS = 8
NAMED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "olmo2", "phi", "gpt2", "gpt_neox", "opt")


@pytest.mark.slow
@pytest.mark.parametrize("shard", range(COVERAGE_SHARDS))
def test_every_tiny_buildable_causal_lm_architecture(shard):
    """What transformers builds tiny passes analyze (finite block metrics) and prune/export
    (reload reproduces the loss), except the few known refusals (>= 98% of the catalogue);
    every named family passes with sublayer metrics."""
    catalogue = cov.causal_lm_types()
    assert len(KNOWN_FAILURES) <= 0.02 * len(catalogue)
    rows = cov.run_all(catalogue[shard::COVERAGE_SHARDS])
    failed = {r.model_type: r.reason for r in rows if r.buildable and r.stage != "ok"}
    assert {t.split("+")[0] for t in failed} <= set(KNOWN_FAILURES), failed
    assert all("Traceback" not in reason for reason in failed.values())
    for row in rows:
        if row.model_type in NAMED_FAMILIES:
            assert row.stage == "ok", (row.model_type, row.reason)
            assert row.metrics.get("grad_norm_attn") and row.metrics.get("drop_delta_loss_mlp"), row.model_type


def _skip_by_hook(block, hands_on=()):
    """A forward hook that makes ``block`` return its own input (plus the kwargs ``hands_on`` it
    was given, for blocks that pass extra state down the loop): the block, removed."""
    def hook(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *(kwargs.get(k) for k in hands_on)) if hands_on else hidden
    return block.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("model_type, hands_on", [("hy_v4", ("prev_topk_indices",)), ("gemma4_text", ())])
def test_drops_of_blocks_that_share_state_equal_the_model_with_that_block_skipped(model_type, hands_on):
    """hy_v4: a 'shared' indexer layer reuses the top-k of the last full one that ran (so a drop
    reruns the prefix); gemma4_text: per-layer inputs are picked by block position (so skipped
    blocks pass their input on). Each drop's loss equals the model's own forward with that block
    made the identity by a hook, and each sublayer drop the forward with that output zeroed."""
    model = cov.build_tiny(model_type)
    stack = LayerStack.from_model(model)
    ids = cov.calibration_windows().input_ids[:2]
    result = depthprobe.analyze(model, windows=ids, metrics="drop", progress=False, batch_size=2,
                                options={"block_sizes": (2,), "bootstrap_samples": 10})
    layers = result.layers
    with torch.no_grad():
        base = float(_mean_loss(model, ids))
        for layer, block in enumerate(stack.blocks):
            handle = _skip_by_hook(block, hands_on)
            try:
                want = float(_mean_loss(model, ids)) - base
            finally:
                handle.remove()
            assert layers["drop_delta_loss"][layer] == pytest.approx(want, abs=1e-5), layer
            for kind in ("attn", "mlp"):
                out = stack.sublayer_output_module(layer, kind)
                if out is None:
                    continue
                handle = out.register_forward_hook(lambda m, a, o: tuple(torch.zeros_like(t) if isinstance(t, torch.Tensor) else t for t in o) if isinstance(o, tuple) else torch.zeros_like(o))
                try:
                    want = float(_mean_loss(model, ids)) - base
                finally:
                    handle.remove()
                assert layers[f"drop_delta_loss_{kind}"][layer] == pytest.approx(want, abs=1e-5), (layer, kind)
        for row in result.tables["block_drop"].itertuples():
            handles = [_skip_by_hook(stack.blocks[i], hands_on) for i in range(row.start, row.end + 1)]
            try:
                want = float(_mean_loss(model, ids)) - base
            except ValueError:  # no full indexer layer left before a shared one: refused, NaN, said
                want = math.nan
            finally:
                for handle in handles:
                    handle.remove()
            if math.isnan(want):
                assert math.isnan(row.delta_loss)
                notes = " ".join(result.summary["notes"])
                assert f"block_drop: not computed for blocks {row.start}-{row.end}" in notes
            else:
                assert row.delta_loss == pytest.approx(want, abs=1e-5), row
    assert np.isfinite(layers["drop_delta_loss"]).all()
    assert stack.reads_earlier_state if model_type == "hy_v4" else stack.positional_inputs


def test_greedy_prune_of_blocks_that_share_state_scores_the_model_without_them():
    """hy_v4 ([full, full, shared] indexers): prune's greedy scores each candidate by the model's
    own forward without it (no cached block input), equal to the model with those blocks made the
    identity by hooks, and never picks a removal its forward cannot run (block 1 after block 0:
    the shared layer would have no full indexer before it)."""
    from depthprobe.prune.select import Evaluator, greedy

    model = cov.build_tiny("hy_v4")
    stack = LayerStack.from_model(model)
    ids = cov.calibration_windows().input_ids[:2]
    evaluator = Evaluator(stack, ids, batch_size=2)

    def hooked_loss(removed):
        handles = [_skip_by_hook(stack.blocks[i], ("prev_topk_indices",)) for i in removed]
        try:
            with torch.no_grad():
                return float(_mean_loss(model, ids))
        finally:
            for handle in handles:
                handle.remove()

    for c, loss in evaluator.removal_losses([], [0, 1, 2]).items():
        assert loss == pytest.approx(hooked_loss([c]), abs=1e-5), c
    after_0 = evaluator.removal_losses([0], [1, 2])
    assert math.isnan(after_0[1]) and after_0[2] == pytest.approx(hooked_loss([0, 2]), abs=1e-5)
    steps = greedy(evaluator, 2, progress=False)
    assert steps[2].removed != [0, 1]
    for step in steps[1:]:
        assert step.loss == pytest.approx(hooked_loss(step.removed), abs=1e-5), step


def test_kv_reuse_refuses_only_the_drops_of_the_blocks_that_store_and_keeps_the_rest():
    """Gemma 4 with KV-shared layers (``kv_sharing_modes`` store, store, reuse, reuse): dropping a
    block that stores KV leaves a reusing layer without it, so those cells are NaN with the reason
    and the intervals still come out for the others, each equal to the hook-skipped model's loss."""
    config = cov.tiny_config("gemma4_text")
    config.num_hidden_layers = 4
    config.layer_types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    config.num_kv_shared_layers = 2
    config.__post_init__()  # derives kv_sharing_modes from the two settings above
    assert config.kv_sharing_modes == ["store", "store", "reuse", "reuse"]
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config).eval()
    stack = LayerStack.from_model(model)
    ids = cov.calibration_windows().input_ids[:2]
    result = depthprobe.analyze(model, windows=ids, metrics="drop", progress=False, batch_size=2,
                                options={"block_sizes": (), "bootstrap_samples": 10})
    layers = result.layers
    assert stack.reads_earlier_state
    assert np.isnan(layers["drop_delta_loss"][:2]).all() and np.isnan(layers["drop_delta_loss_lo"][:2]).all()
    assert "drop_delta_loss: not computed for block 0, block 1" in " ".join(result.summary["notes"])
    with torch.no_grad():
        base = float(_mean_loss(model, ids))
        for layer in (2, 3):
            handle = _skip_by_hook(stack.blocks[layer])
            try:
                want = float(_mean_loss(model, ids)) - base
            finally:
                handle.remove()
            assert layers["drop_delta_loss"][layer] == pytest.approx(want, abs=1e-5)
            assert layers["drop_delta_loss_lo"][layer] <= layers["drop_delta_loss"][layer] + 1e-9
