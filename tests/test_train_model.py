"""The trainer's model: each norm placement computes exactly its formula."""

from __future__ import annotations

import math

import pytest
import torch

import depthprobe
from depthprobe.errors import DepthprobeError
from depthprobe.model.stack import LayerStack
from depthprobe.probes.hooks import zero_output
from depthprobe.train.data import byte_tokenizer
from depthprobe.train.model import (
    PLACEMENT_NAMES,
    PRESETS,
    DepthprobeLMForCausalLM,
    ModelConfig,
    build_model,
    rotary,
)

TINY = dict(PRESETS["tiny"], vocab_size=40, max_position_embeddings=32)


def model_for(placement: str, norm_type: str = "rms", seed: int = 0, **kw) -> DepthprobeLMForCausalLM:
    return build_model(ModelConfig(**TINY, norm_placement=placement, norm_type=norm_type, **kw), seed).double()


def hand_norm(module, x, eps=1e-5):
    """RMSNorm / LayerNorm written out, with the module's own gain (and bias)."""
    if hasattr(module, "bias") and module.bias is not None:  # LayerNorm
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * module.weight + module.bias
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * module.weight


def hand_dyt(module, x):
    """DyT(x) = gamma * tanh(alpha * x) + beta, with the module's own parameters."""
    return module.weight * torch.tanh(module.alpha * x) + module.bias


def expected_block(placement: str, block, x, layer: int, num_layers: int, rope, mix_post: int = 1):
    """The DESIGN.md table, written out for attention then MLP."""
    sublayers = [
        (lambda h: block.self_attn(h, rope), block.attn_norm_in, block.attn_norm_out, block.attn_norm_post),
        (block.mlp, block.mlp_norm_in, block.mlp_norm_out, block.mlp_norm_post),
    ]
    h = x
    for f, n_in, n_out, n_post in sublayers:
        if placement == "mix":
            placement_l = "post" if layer < mix_post else "pre"
        else:
            placement_l = placement
        if placement_l == "pre":
            h = h + f(hand_norm(n_in, h))
        elif placement_l == "post":
            h = hand_norm(n_post, h + f(h))
        elif placement_l == "peri":
            h = h + hand_norm(n_out, f(hand_norm(n_in, h)))
        elif placement_l == "lns":
            h = h + f(hand_norm(n_in.norm, h) / math.sqrt(layer + 1))
        elif placement_l == "deepnorm":
            h = hand_norm(n_post, (2 * num_layers) ** 0.25 * h + f(h))
        elif placement_l == "dyt":
            h = h + f(hand_dyt(n_in, h))
    return h


@pytest.mark.parametrize("norm_type", ["rms", "layer"])
@pytest.mark.parametrize("placement", PLACEMENT_NAMES)
def test_each_block_computes_its_formula(placement, norm_type):
    model = model_for(placement, norm_type)
    with torch.no_grad():  # make norm gains and biases non-trivial so they matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    cfg = model.config.spec
    x = torch.randn(2, 7, cfg.hidden_size, dtype=torch.float64)
    rope = rotary(cfg.head_dim, cfg.rope_theta, 7, x.device)
    for layer, block in enumerate(model.model.layers):
        got = block(x, rope)
        want = expected_block(placement, block, x, layer, cfg.num_hidden_layers, rope, cfg.num_post_blocks)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_attention_is_causal_rope_attention():
    model = model_for("pre")
    attn = model.model.layers[0].self_attn
    B, T, C, H = 2, 6, 64, 4
    hd = C // H
    x = torch.randn(B, T, C, dtype=torch.float64)

    def heads(w):
        return (x @ w.T).view(B, T, H, hd)

    def rotate(v):  # pair (i, i + hd/2) rotated by t * theta^(-2i/hd)
        out = v.clone()
        for t in range(T):
            for i in range(hd // 2):
                a = t * 10000.0 ** (-2 * i / hd)
                v1, v2 = v[:, t, :, i], v[:, t, :, i + hd // 2]
                out[:, t, :, i] = v1 * math.cos(a) - v2 * math.sin(a)
                out[:, t, :, i + hd // 2] = v2 * math.cos(a) + v1 * math.sin(a)
        return out

    q, k, v = rotate(heads(attn.q_proj.weight)), rotate(heads(attn.k_proj.weight)), heads(attn.v_proj.weight)
    y = torch.zeros(B, T, H, hd, dtype=torch.float64)
    for t in range(T):
        scores = torch.einsum("bhd,bshd->bhs", q[:, t], k[:, : t + 1]) / math.sqrt(hd)
        y[:, t] = torch.einsum("bhs,bshd->bhd", scores.softmax(-1), v[:, : t + 1])
    want = y.reshape(B, T, C) @ attn.o_proj.weight.T
    got = attn(x, rotary(hd, 10000.0, T, x.device))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)  # RoPE tables are float32, as in Llama


def test_mix_quarter_of_twelve_blocks_is_post_ln():
    cfg = ModelConfig(**dict(TINY, num_hidden_layers=12), norm_placement="mix", mix_alpha=0.25)
    model = build_model(cfg, 0)
    kinds = []
    for block in model.model.layers:
        post = not isinstance(block.attn_norm_post, torch.nn.Identity)
        pre = not isinstance(block.attn_norm_in, torch.nn.Identity)
        assert post != pre
        kinds.append("post" if post else "pre")
    assert kinds == ["post"] * 3 + ["pre"] * 9
    for L, alpha in [(12, 0.25), (10, 0.25), (8, 0.3), (4, 0.0), (4, 1.0)]:
        assert ModelConfig(**dict(TINY, num_hidden_layers=L), mix_alpha=alpha).num_post_blocks == int(alpha * L + 0.5)


def test_same_seed_same_weights_in_every_placement():
    ref = dict(model_for("pre", seed=3).named_parameters())
    for placement in ("post", "peri", "lns", "mix"):
        for name, p in model_for(placement, seed=3).named_parameters():
            if "norm" not in name:
                assert torch.equal(p, ref[name]), (placement, name)
    assert not torch.equal(model_for("pre", seed=4).lm_head.weight, ref["lm_head.weight"])


def test_deepnorm_scaled_init():
    plain = model_for("deepnorm", deepnorm_init=False)
    scaled = model_for("deepnorm", deepnorm_init=True)
    gain = (8 * TINY["num_hidden_layers"]) ** -0.25
    for name, p in scaled.named_parameters():
        q = dict(plain.named_parameters())[name]
        scaled_names = ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        torch.testing.assert_close(p, q * gain if any(s in name for s in scaled_names) else q, rtol=1e-6, atol=0)


def test_loss_is_mean_next_token_cross_entropy():
    model = model_for("peri")
    ids = torch.randint(0, 40, (3, 9))
    out = model(input_ids=ids, labels=ids, use_cache=False)
    logp = out.logits.log_softmax(-1)
    hand = -sum(logp[b, t, ids[b, t + 1]] for b in range(3) for t in range(8)) / 24
    torch.testing.assert_close(out.loss.double(), hand, rtol=0, atol=1e-10)
    with pytest.raises(DepthprobeError, match="padding"):
        model(input_ids=ids, attention_mask=torch.zeros_like(ids))


def test_tied_head_shares_embedding():
    model = model_for("pre", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model_for("pre").lm_head.weight is not model_for("pre").model.embed_tokens.weight


def test_bad_config_is_one_line_error():
    with pytest.raises(DepthprobeError, match="norm placement"):
        ModelConfig(norm_placement="middle")
    with pytest.raises(DepthprobeError, match="mix-alpha"):
        ModelConfig(mix_alpha=1.5)
    with pytest.raises(DepthprobeError, match="heads"):
        ModelConfig(hidden_size=30, num_attention_heads=4)


@pytest.mark.parametrize("placement", ["post", "peri"])
def test_saved_model_loads_and_layerstack_finds_parts(tmp_path, placement):
    model = build_model(ModelConfig(**dict(TINY, vocab_size=259), norm_placement=placement), 0).eval()
    model.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    loaded, tok = depthprobe.load_model(tmp_path, device="cpu")
    ids = torch.tensor([tok("The model", add_special_tokens=False)["input_ids"]])
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)

    stack = LayerStack.from_model(loaded)
    assert (stack.family, stack.blocks_path, len(stack), stack.norm_placement) == (
        "depthprobe_lm", "model.layers", 4, placement,
    )  # fmt: skip
    assert stack.embed is loaded.model.embed_tokens and stack.final_norm is loaded.model.norm
    # the stack's logits from the last block's raw output reproduce the model's
    hidden = []
    handle = loaded.model.layers[-1].register_forward_hook(lambda m, a, o: hidden.append(o))
    logits = loaded(input_ids=ids).logits
    handle.remove()
    torch.testing.assert_close(stack.logits(hidden[0]), logits)
    # zeroing the attention contribution of block 1 is the formula with F = 0
    block = loaded.model.layers[1]
    x = torch.randn(1, 5, 64)
    rope = rotary(16, 10000.0, 5, x.device)
    with torch.no_grad(), zero_output(stack.sublayer_output_module(1, "attn")):
        got = block(x, rope)
        h = block.attn_norm_post(x)
        want = block.mlp_norm_post(h + block.mlp_norm_out(block.mlp(block.mlp_norm_in(h))))
    torch.testing.assert_close(got, want)
    names = [type(m).__name__ for m in stack.sublayer_modules(1, "mlp")]
    assert "SwiGLU" in names and ("RMSNorm" in names)


def test_dyt_forward_is_its_formula_and_replaces_every_norm():
    """DyT in numpy: gamma * tanh(alpha * x) + beta, alpha initialised to alpha0 (the paper's 0.5)."""
    import numpy as np

    from depthprobe.train.model import DyT

    model = model_for("dyt", dyt_alpha0=0.8)
    dyts = [m for m in model.modules() if isinstance(m, DyT)]
    assert len(dyts) == 2 * TINY["num_hidden_layers"] + 1  # two per block and the final norm
    assert isinstance(model.model.norm, DyT)
    assert not any(isinstance(m, torch.nn.LayerNorm) or type(m).__name__ == "RMSNorm" for m in model.modules())
    assert all(float(m.alpha) == pytest.approx(0.8, abs=1e-7) and bool((m.weight == 1).all()) and bool((m.bias == 0).all()) for m in dyts)
    assert float(DyT(5, 0.5).alpha) == 0.5 and ModelConfig().dyt_alpha0 == 0.5
    norm = dyts[3]
    with torch.no_grad():
        norm.alpha.fill_(1.7)
        norm.weight.copy_(torch.linspace(-2, 2, norm.weight.numel()))
        norm.bias.copy_(torch.linspace(0.5, -1, norm.bias.numel()))
    x = torch.randn(3, 5, TINY["hidden_size"], dtype=torch.float64) * 3
    want = norm.weight.detach().numpy() * np.tanh(1.7 * x.numpy()) + norm.bias.detach().numpy()
    np.testing.assert_allclose(norm(x).detach().numpy(), want, rtol=0, atol=1e-12)
    with pytest.raises(DepthprobeError, match="dyt-alpha0"):
        ModelConfig(norm_placement="dyt", dyt_alpha0=0.0)
    with pytest.raises(DepthprobeError, match="dyt-alpha0-attn"):
        ModelConfig(norm_placement="dyt", dyt_alpha0_attn=-1.0)


def test_dyt_llm_recipe_attention_alpha0_and_embedding_scalar():
    """The paper's LLM recipe: the attention-input DyT gets its own alpha0, the MLP-input and
    final DyT the other; a learnable scalar sqrt(d) multiplies the embeddings. The whole
    model's logits equal head(DyT_final(blocks(s * E[ids]))) written out by hand."""
    from depthprobe.train.model import DyT

    model = model_for("dyt", dyt_alpha0=0.3, dyt_alpha0_attn=1.2)
    assert all(float(b.attn_norm_in.alpha) == pytest.approx(1.2) for b in model.model.layers)
    assert all(float(b.mlp_norm_in.alpha) == pytest.approx(0.3) for b in model.model.layers)
    assert float(model.model.norm.alpha) == pytest.approx(0.3) and isinstance(model.model.norm, DyT)
    assert float(model.model.embed_scale) == pytest.approx(math.sqrt(TINY["hidden_size"]))
    with torch.no_grad():
        model.model.embed_scale.fill_(5.5)  # a value apart from the init, so that it must be used
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    cfg = model.config.spec
    rope = rotary(cfg.head_dim, cfg.rope_theta, 9, ids.device)
    h = 5.5 * model.model.embed_tokens.weight[ids]
    for layer, block in enumerate(model.model.layers):
        h = expected_block("dyt", block, h, layer, cfg.num_hidden_layers, rope)
    want = hand_dyt(model.model.norm, h) @ model.lm_head.weight.T
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=1e-10)
    assert not hasattr(model_for("dyt", dyt_embed_scale=False).model, "embed_scale")
    assert not hasattr(model_for("pre").model, "embed_scale")
    untied = dict(model_for("dyt", seed=3).named_parameters())  # the scalar draws no random numbers
    for name, p in model_for("pre", seed=3).named_parameters():
        if "norm" not in name:
            assert torch.equal(p, untied[name]), name
