"""The engine's pieces on their own: batches carry any input dict, hook sites have one name
grammar, and the objective is the one place that reads the model's output."""

from __future__ import annotations

import pytest
import torch

from depthprobe.errors import DepthprobeError
from depthprobe.model.stack import LayerStack
from depthprobe.probes.batch import split_batches, token_batches
from depthprobe.probes.hooks import evaluating, site, watch_sites
from depthprobe.probes.objective import Objective, objective_for, register_objective
from tests.tiny_models import build_tiny, random_ids


def test_batches_cut_every_input_and_keep_lm_targets_one_tensor():
    ids, pixels, labels = random_ids(5, 6), torch.randn(5, 3, 4, 4), torch.arange(5)
    batches = split_batches({"pixel_values": pixels, "extra": ids}, labels, 2)
    assert [b.rows for b in batches] == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert torch.equal(torch.cat([b.inputs["pixel_values"] for b in batches]), pixels)
    assert torch.equal(torch.cat([b.targets for b in batches]), labels)
    moved = token_batches(ids, 3)[1].to("cpu")
    assert torch.equal(moved.input_ids, ids[3:]) and moved.targets is moved.inputs["input_ids"]


def test_hook_sites_are_named_like_transformerlens():
    """resid_pre / resid_post are the block's input and output (the model's hidden states),
    attn_out and mlp_out what the sublayers add: resid_mid = resid_pre + attn_out and
    resid_post = resid_mid + mlp_out in a Pre-LN block."""
    model = build_tiny("llama").eval()
    stack, ids = LayerStack.from_model(model), random_ids(2, 7)
    names = [site(1, p) for p in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")]
    seen = {}
    with torch.no_grad(), watch_sites(stack, {n: (lambda t, n=n: seen.setdefault(n, t.clone())) for n in names}):
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    pre, attn, mid, mlp, post = (seen[n] for n in names)
    torch.testing.assert_close(pre, hidden[1])
    torch.testing.assert_close(post, hidden[2])
    torch.testing.assert_close(mid, pre + attn)
    torch.testing.assert_close(post, mid + mlp)
    with pytest.raises(DepthprobeError, match="hook site"):
        watch_sites(stack, {"blocks.1.hook_attn": print}).__enter__()
    with pytest.raises(DepthprobeError, match="unknown hook site"):
        site(0, "attn")


def test_evaluating_restores_the_mode_even_on_error():
    model = build_tiny("llama").train()
    with pytest.raises(RuntimeError), evaluating(model):
        assert not model.training
        raise RuntimeError
    assert model.training


def test_a_registered_objective_scores_its_stacks():
    class Doubled(Objective):
        def window_scores(self, out, batch, reference):
            return 2 * super().window_scores(out, batch, reference)

    model = build_tiny("gpt2").eval()
    stack = LayerStack.from_model(model)
    register_objective(lambda s: s.model is model, Doubled)
    try:
        assert type(objective_for(stack)) is Doubled
        assert type(objective_for(LayerStack.from_model(build_tiny("gpt2")))) is Objective
        from depthprobe.probes.scoring import WindowScorer

        ids = random_ids(3, 8)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="none").view(3, -1).double().mean(1)
        torch.testing.assert_close(torch.from_numpy(WindowScorer(stack, ids, 2).scores()), 2 * nll)
    finally:
        from depthprobe.probes import objective as O

        O._OBJECTIVES[:] = [(a, o) for a, o in O._OBJECTIVES if o is not Doubled]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nll_formulas_equal_a_per_token_loop(dtype):
    """per_sequence_nll (row by row, no copy), shifted_nll_sum (pre-aligned rows) and
    next_token_nll_sum against -log softmax(logits_t)[x_{t+1}] summed by hand."""
    from depthprobe.probes import metrics as M

    torch.manual_seed(0)
    logits, ids = (torch.randn(3, 7, 11) * 4).to(dtype), torch.randint(0, 11, (3, 7))
    by_hand = torch.tensor([[-torch.log_softmax(logits[b, t].double(), -1)[ids[b, t + 1]] for t in range(6)]
                            for b in range(3)], dtype=torch.float64)
    tol = 1e-6 if dtype == torch.float32 else 1e-5
    torch.testing.assert_close(M.per_sequence_nll(logits, ids), by_hand.mean(1), rtol=tol, atol=tol)
    total, count = M.next_token_nll_sum(logits, ids)
    assert count == 18 and float(total) == pytest.approx(float(by_hand.sum()), rel=tol)
    assert float(M.shifted_nll_sum(logits[:, :-1], ids[:, 1:])) == pytest.approx(float(by_hand.sum()), rel=tol)
    # a non-contiguous view gives the same rows
    strided = logits.transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(M.per_sequence_nll(strided, ids), M.per_sequence_nll(logits, ids))
