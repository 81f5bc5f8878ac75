"""Training-free repair: the map solved, fused exactly, validated, declined where it cannot help."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from depthprobe.errors import DepthprobeError
from depthprobe.model.stack import LayerStack
from depthprobe.prune.export import remove_blocks
from depthprobe.prune.repair import mlp_writer, removed_spans, repair_linear, solve_linear
from depthprobe.prune.select import Evaluator
from tests.tiny_models import build_tiny, random_ids


def test_removed_spans_are_maximal_runs():
    assert removed_spans([7, 3, 4]) == [(3, 5), (7, 8)]
    assert removed_spans([0, 1, 2]) == [(0, 3)]
    assert removed_spans([]) == []


def _hidden_and_writer_output(model, ids, layer):
    """Full model: stream x_i for every i (``output_hidden_states``) and block ``layer``'s MLP
    writer output, from a plain hook on that linear."""
    stack = LayerStack.from_model(model)
    _, writer = mlp_writer(stack, layer)
    seen = []
    handle = writer.register_forward_hook(lambda mod, args, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    return out.hidden_states, seen[0]


def test_least_squares_map_equals_numpy_lstsq():
    """One span (2): m = writer output of block 1, y = x_2 - m, target x_3 of the full model;
    the map equals numpy.linalg.lstsq(m, x_3 - y) on the same activations."""
    model = build_tiny("llama", num_hidden_layers=5)
    ids = random_ids(8, 16)
    hidden, m = _hidden_and_writer_output(model, ids, 1)
    d = m.shape[-1]
    m64 = m.reshape(-1, d).double().numpy()
    y64 = hidden[2].reshape(-1, d).double().numpy() - m64
    target = hidden[3].reshape(-1, d).double().numpy()
    expected = np.linalg.lstsq(m64, target - y64, rcond=None)[0]
    result = repair_linear(model, [2], ids, ridge=0.0, val_fraction=0.0, weighting="none")
    np.testing.assert_allclose(result.maps[(2, 3)].numpy(), expected, atol=1e-6, rtol=0)
    # token weights 1/||x_3||: numpy on rows scaled by them
    w = 1 / np.linalg.norm(hidden[3].reshape(-1, d).numpy(), axis=1, keepdims=True)
    weighted = np.linalg.lstsq(m64 * w, (target - y64) * w, rcond=None)[0]
    result.restore()
    result = repair_linear(model, [2], ids, ridge=0.0, val_fraction=0.0, weighting="norm")
    np.testing.assert_allclose(result.maps[(2, 3)].numpy(), weighted, atol=1e-6, rtol=0)


def test_ridge_pulls_the_map_toward_identity():
    g = torch.Generator().manual_seed(0)
    m, r = torch.randn(200, 6, generator=g), torch.randn(200, 6, generator=g)
    assert torch.allclose(solve_linear(m, r, ridge=1e9), torch.eye(6, dtype=torch.float64), atol=1e-6)
    # ridge λ: (mᵀm + λI) T = mᵀr + λI, solved by hand
    lam = 0.5 * float((m.double() ** 2).sum()) / 6
    by_hand = torch.linalg.solve(m.double().T @ m.double() + lam * torch.eye(6, dtype=torch.float64),
                                 m.double().T @ r.double() + lam * torch.eye(6, dtype=torch.float64))
    assert torch.allclose(solve_linear(m, r, ridge=0.5), by_hand, atol=1e-9)


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi", "opt", "gpt_neox", "qwen2"])
def test_fused_weights_equal_applying_the_map_explicitly(family):
    """Logits of the pruned model with maps fused into the writers equal those of the pruned
    model whose (original) writers' outputs are multiplied by the same maps through a hook."""
    removed = [1, 3]
    ids = random_ids(8, 16)
    fused_model = build_tiny(family)  # 4 blocks: the second span ends at the last block
    explicit_model = build_tiny(family)
    result = repair_linear(fused_model, removed, ids, ridge=1e-3, val_fraction=0.0)
    assert sorted(result.maps) == [(1, 2), (3, 4)]
    stack = LayerStack.from_model(explicit_model)
    handles = []
    for start, _ in result.maps:
        T = result.maps[(start, start + 1)].float()
        _, writer = mlp_writer(stack, start - 1)
        handles.append(writer.register_forward_hook(lambda mod, args, out, T=T: out @ T))
    try:
        with torch.no_grad():
            remove_blocks(stack, removed)
            expected = explicit_model(input_ids=ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    remove_blocks(LayerStack.from_model(fused_model), removed)
    with torch.no_grad():
        got = fused_model(input_ids=ids, use_cache=False).logits
    assert not torch.allclose(result.maps[(1, 2)], torch.eye(32, dtype=torch.float64), atol=1e-3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_validation_declines_what_does_not_help_and_never_hurts():
    """Accepted spans lowered the validation loss; declined spans left the weights bit for bit;
    the validation loss after repair is never above plain removal's."""
    model = build_tiny("llama", num_hidden_layers=6)
    ids = random_ids(10, 16, seed=3)
    stack = LayerStack.from_model(model)
    removed = [1, 2, 4]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    val = Evaluator(stack, ids[8:])
    plain = val.loss(removed)
    result = repair_linear(model, removed, ids, ridge=0.0, val_fraction=0.2)
    table = result.table
    assert list(zip(table["start"], table["stop"], strict=True)) == [(1, 3), (4, 5)]
    assert val.loss(removed) <= plain + 1e-9
    for row in table.itertuples():
        if row.applied:
            assert row.val_loss_repaired < row.val_loss_plain
        else:
            assert "validation loss" in row.reason
            key = f"{row.writer}.weight"
            assert torch.equal(model.state_dict()[key], before[key])
    result.restore()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_declined_where_no_exact_fusion_or_no_block_before():
    model = build_tiny("gemma2")
    ids = random_ids(8, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = repair_linear(model, [2], ids, val_fraction=0.0).table
    assert not table["applied"].any() and "peri" in table["reason"][0]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    table = repair_linear(build_tiny("llama"), [0, 1], ids, val_fraction=0.0).table
    assert not table["applied"].any() and "no kept block before" in table["reason"][0]


def test_bad_input_is_one_line():
    model = build_tiny("llama")
    with pytest.raises(DepthprobeError, match="at least 32 tokens"):
        repair_linear(model, [2], random_ids(2, 8), val_fraction=0.5)
    with pytest.raises(DepthprobeError, match="at least 2 windows"):
        repair_linear(model, [2], random_ids(1, 64))
    with pytest.raises(DepthprobeError, match="unknown --repair"):
        repair_linear(model, [2], random_ids(8, 16), method="quadratic")
    with pytest.raises(DepthprobeError, match="out of range"):
        repair_linear(model, [9], random_ids(8, 16))


def test_cosine_solver_lowers_the_mean_cosine_distance():
    """Adam from the least-squares map lowers mean(1 - cos(y + mT, target)), computed by hand."""
    from depthprobe.prune.repair import solve_cosine

    g = torch.Generator().manual_seed(1)
    m, y = torch.randn(512, 8, generator=g), torch.randn(512, 8, generator=g)
    true = torch.randn(8, 8, generator=g)
    target = (y + m @ true) * torch.rand(512, 1, generator=g) * 10 + 0.3 * torch.randn(512, 8, generator=g)

    def distance(T):
        out = y.double() + m.double() @ T
        return float((1 - torch.nn.functional.cosine_similarity(out, target.double(), dim=-1)).mean())

    start = solve_linear(m, target - y, 0.0)
    refined = solve_cosine(m, y, target, start, steps=200, lr=1e-2, batch_tokens=256)
    assert distance(refined) < distance(start) - 1e-3


def test_ridge_grid_keeps_the_map_with_the_lowest_validation_loss():
    """With several ridges, the kept map is the one whose own single-ridge repair validates best;
    declined (weights untouched) only when none beats plain removal."""
    ids = random_ids(10, 16, seed=5)
    single = {}
    for ridge in (0.0, 1e-2, 1.0):
        model = build_tiny("llama", num_hidden_layers=6)
        table = repair_linear(model, [2, 3], ids, ridges=(ridge,), val_fraction=0.2).table
        single[ridge] = table.loc[0, "val_loss_repaired"]
    model = build_tiny("llama", num_hidden_layers=6)
    table = repair_linear(model, [2, 3], ids, ridges=(0.0, 1e-2, 1.0), val_fraction=0.2).table
    best = min(single, key=single.get)
    assert table.loc[0, "val_loss_repaired"] == pytest.approx(single[best], abs=1e-9)
    assert table.loc[0, "map"] == f"linear ridge={best:g}"
    assert table.loc[0, "applied"] == (single[best] < table.loc[0, "val_loss_plain"])


def test_after_seam_map_is_a_second_validated_writer():
    """``after=True`` adds a map in the first kept block after each span: rows before/after per span,
    the validation loss (measured independently) is the last accepted row's and never above the
    before-only repair's."""
    ids = random_ids(10, 16, seed=7)
    model = build_tiny("llama", num_hidden_layers=6)
    val = Evaluator(LayerStack.from_model(model), ids[8:])
    only_before = repair_linear(model, [1, 2], ids, ridges=(1e-2,), val_fraction=0.2)
    before_loss = val.loss([1, 2])
    only_before.restore()
    result = repair_linear(model, [1, 2], ids, ridges=(1e-2,), val_fraction=0.2, after=True)
    table = result.table
    assert list(table["side"]) == ["before", "after"]
    assert table.loc[1, "writer"].endswith(".3.mlp.down_proj")  # block 3: the first kept after 1..2
    now = val.loss([1, 2])
    accepted = table[table["applied"]]
    assert now == pytest.approx(accepted["val_loss_repaired"].iloc[-1] if len(accepted) else table.loc[0, "val_loss_plain"])
    assert now <= before_loss + 1e-9
