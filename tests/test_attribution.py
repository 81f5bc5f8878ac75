"""Per-block attribution (captum layer conductance, gradient x activation) on tiny models.

Every value is checked against an independent computation: captum's own LayerConductance /
LayerGradientXActivation run block by block, a hand-written loop over the path with plain
autograd, and the model's own LM loss for the target.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from depthprobe.analysis import analyze
from depthprobe.data import Windows
from depthprobe.model.stack import LayerStack
from depthprobe.probes.attribution import (
    block_conductance,
    lm_target,
    mean_embedding,
    normalise,
)
from tests.tiny_models import FAMILY_NAMES, build_tiny, random_ids

STEPS = 6


@pytest.fixture(scope="module")
def llama():
    model = build_tiny("llama")
    return model, LayerStack.from_model(model)


def _embeds_and_baseline(model, ids):
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    return embeds, mean_embedding(model).expand_as(embeds).clone()


def test_matches_captum_layer_conductance_block_by_block(llama):
    from captum.attr import LayerConductance

    model, stack = llama
    ids = random_ids(3, 12, seed=1)
    ours = block_conductance(stack, ids, steps=STEPS, batch_size=2, rule="left")
    embeds, baseline = _embeds_and_baseline(model, ids)
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for layer, block in enumerate(stack.blocks):
            attr, delta = LayerConductance(lm_target(model), block).attribute(
                embeds,
                baselines=baseline,
                additional_forward_args=(ids,),
                n_steps=STEPS,
                method="riemann_trapezoid",
                return_convergence_delta=True,
            )
            np.testing.assert_allclose(ours.conductance[layer], attr.abs().sum((1, 2)).detach().double(), rtol=1e-4)
            np.testing.assert_allclose(ours.signed[layer], attr.sum((1, 2)).detach().double(), rtol=1e-4, atol=1e-5)
            # completeness: signed sum = f(e) - f(e') up to exactly captum's reported delta
            np.testing.assert_allclose(ours.convergence_delta[layer], delta.detach().double(), rtol=1e-3, atol=1e-5)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


def test_matches_hand_rolled_path_loop_on_one_block(llama):
    """Plain autograd: capture block 2's output at each path point, accumulate
    w_k * (y(alpha_{k+1}) - y(alpha_k)) with w_k the left or the trapezoid gradient."""
    model, stack = llama
    ids = random_ids(2, 10, seed=2)
    layer = 2
    embeds, baseline = _embeds_and_baseline(model, ids)
    grads, outs = [], []
    captured = {}

    def hook(module, args, output):
        output.retain_grad()
        captured["y"] = output

    for k in range(STEPS + 1):
        point = baseline + (k / STEPS) * (embeds - baseline)
        handle = stack.blocks[layer].register_forward_hook(hook)
        try:
            logits = model(inputs_embeds=point).logits[:, :-1]
            target = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).sum()
            target.backward()
        finally:
            handle.remove()
        grads.append(captured["y"].grad.double())
        outs.append(captured["y"].detach().double())
    model.zero_grad(set_to_none=True)
    for rule, weight in (
        ("left", lambda k: grads[k]),
        ("trapezoid", lambda k: (grads[k] + grads[k + 1]) / 2),
    ):
        conductance = sum(weight(k) * (outs[k + 1] - outs[k]) for k in range(STEPS))
        ours = block_conductance(stack, ids, steps=STEPS, batch_size=1, rule=rule)
        np.testing.assert_allclose(ours.conductance[layer], conductance.abs().sum((1, 2)), rtol=1e-4)
        np.testing.assert_allclose(ours.signed[layer], conductance.sum((1, 2)), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(ours.gxa[layer], (grads[-1] * outs[-1]).abs().sum((1, 2)), rtol=1e-4)


def test_target_is_the_models_own_log_likelihood(llama):
    model, stack = llama
    ids = random_ids(3, 9, seed=3)
    res = block_conductance(stack, ids, steps=2)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").sum(1)
    np.testing.assert_allclose(res.target, -nll.double(), rtol=1e-5)


def test_convergence_delta_shrinks_with_steps(llama):
    _, stack = llama
    ids = random_ids(2, 10, seed=4)
    def delta(steps, rule):
        return np.abs(block_conductance(stack, ids, steps=steps, rule=rule).convergence_delta).max()

    left = [delta(s, "left") for s in (2, 8, 32)]
    assert left[0] > left[1] > left[2]
    assert left[2] < 0.4 * left[1]  # left Riemann sum: error ~ 1/steps (ratio 0.25 ideally)
    trap = [delta(s, "trapezoid") for s in (8, 32)]
    assert trap[1] < 0.15 * trap[0]  # trapezoid rule: error ~ 1/steps^2 (ratio 1/16 ideally)
    assert trap[0] < left[1]


def test_gradient_x_activation_matches_captum(llama):
    from captum.attr import LayerGradientXActivation

    model, stack = llama
    ids = random_ids(2, 8, seed=5)
    ours = block_conductance(stack, ids, steps=1)
    embeds, _ = _embeds_and_baseline(model, ids)
    attrs = LayerGradientXActivation(lm_target(model), list(stack.blocks)).attribute(
        embeds.requires_grad_(), additional_forward_args=(ids,)
    )
    model.zero_grad(set_to_none=True)
    for layer, attr in enumerate(attrs):
        np.testing.assert_allclose(ours.gxa[layer], attr.abs().sum((1, 2)).detach().double(), rtol=1e-4)


def test_batch_size_does_not_change_the_result(llama):
    _, stack = llama
    ids = random_ids(5, 8, seed=6)
    a = block_conductance(stack, ids, steps=3, batch_size=5)
    b = block_conductance(stack, ids, steps=3, batch_size=2)
    np.testing.assert_allclose(a.conductance, b.conductance, rtol=1e-4)
    np.testing.assert_allclose(a.gxa, b.gxa, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_sweep_through_analyze_every_family(family):
    model = build_tiny(family)
    windows = Windows(random_ids(3, 12, seed=7), "random")
    result = analyze(model, windows=windows, metrics="attribution", options={"attribution_steps": 2}, progress=False)
    layers = result.layers
    for col in ("attribution", "attribution_gxa"):
        assert np.isfinite(layers[col]).all() and (layers[col] >= 0).all()
        assert layers[col].sum() == pytest.approx(1.0)
    # the column is the per-window table summed over windows, normalised
    per_window = result.tables["attribution_windows"]
    assert len(per_window) == len(layers) * 3
    masses = per_window.groupby("layer")[["attribution", "attribution_gxa"]].sum()
    np.testing.assert_allclose(layers["attribution"], masses["attribution"] / masses["attribution"].sum())
    direct = block_conductance(LayerStack.from_model(model), windows.input_ids, steps=2)
    np.testing.assert_allclose(layers["attribution"], normalise(direct.conductance), rtol=1e-5)
    assert result.summary["attribution_steps"] == 2
    assert result.summary["attribution_convergence_delta"] >= 0


def test_parameters_and_mode_are_restored(llama):
    model, stack = llama
    model.train()
    model.lm_head.weight.requires_grad_(False)
    try:
        block_conductance(stack, random_ids(1, 6), steps=1)
        assert model.training
        assert not model.lm_head.weight.requires_grad
        assert all(p.requires_grad for p in stack.blocks.parameters())
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()
        model.lm_head.weight.requires_grad_(True)


def _run_cli(argv, capsys):
    from depthprobe.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr()


def test_cli_attribution_steps(tiny_dir, tmp_path, capsys):
    folder = tiny_dir("llama")
    out = tmp_path / "run"
    code, _ = _run_cli(
        [
            "analyze", str(folder), "--metrics", "angular,attribution", "--attribution-steps", "3",
            "--num-sequences", "2", "--seq-len", "16", "--out", str(out), "--quiet", "--no-report",
        ],
        capsys,
    )  # fmt: skip
    assert code == 0
    layers = pd.read_csv(out / "layers.csv")
    assert layers["attribution"].sum() == pytest.approx(1.0)
    assert (out / "attribution_windows.csv").is_file()
    import json

    assert json.loads((out / "summary.json").read_text())["attribution_steps"] == 3


def test_cli_rejects_zero_steps_in_one_line(tiny_dir, capsys):
    code, captured = _run_cli(
        ["analyze", str(tiny_dir("llama")), "--metrics", "attribution", "--attribution-steps", "0"], capsys
    )
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --attribution-steps must be at least 1")
