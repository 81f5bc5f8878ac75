"""Pre-LN -> Pre-RMSNorm / Pre-CRMSNorm: same logits, no LayerNorm left, clear refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import depthprobe
from depthprobe.cli import main
from depthprobe.convert import CRMSNorm, RMSNorm, convert, convert_to_crmsnorm, convert_to_rmsnorm
from tests.tiny_models import build_tiny, random_ids, save_tiny

# (family, overrides): every Pre-LN family in the table, and GPT-NeoX with parallel residual
CASES = {
    "gpt2": {},
    "gpt_neox": {},
    "gpt_neox-parallel": {"use_parallel_residual": True},
    "opt": {},
    "phi": {},
    "depthprobe_lm": {},
}
KINDS = ("rmsnorm", "crmsnorm")


def _tiny(case: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A tiny model whose every bias is random and whose embeddings have a large per-row mean,
    so that neither folding the biases nor centering the stream can be skipped unnoticed."""
    model = build_tiny(case.split("-")[0], seed=seed, dtype=dtype, **CASES[case])
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                m.weight.add_(torch.randn(m.weight.shape[0], 1, generator=gen, dtype=m.weight.dtype))
    return model


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def _count(model: nn.Module, cls) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(CASES))
def test_same_logits_fp64(case, kind):
    model = _tiny(case, torch.float64)
    n_layernorms = _count(model, nn.LayerNorm)
    ids = random_ids(3, 16)
    converted = convert(model, kind)
    delta = (_logits(converted, ids) - _logits(model, ids)).abs().max().item()
    assert delta <= 1e-10
    assert _count(converted, nn.LayerNorm) == 0
    assert _count(converted, RMSNorm if kind == "rmsnorm" else CRMSNorm) == n_layernorms


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(CASES))
def test_same_logits_fp32(case, kind):
    model = _tiny(case, torch.float32)
    ids = random_ids(3, 16)
    reference = _logits(model, ids)
    converted = convert(model, kind)
    assert (_logits(converted, ids) - reference).abs().max().item() <= 1e-4 * reference.abs().max().item()
    assert _count(converted, nn.LayerNorm) == 0


@pytest.mark.parametrize("case", ["gpt2", "gpt_neox-parallel", "opt"])
def test_stream_is_the_centered_original(case):
    """Between blocks, the Pre-RMSNorm stream is the original stream minus its mean, and the
    Pre-CRMSNorm stream is that without its last coordinate (the final entry of
    ``hidden_states`` is after the final norm, so it is left out)."""
    model = _tiny(case, torch.float64)
    ids = random_ids(2, 12)
    with torch.no_grad():
        original = model(input_ids=ids, output_hidden_states=True).hidden_states[:-1]
        rms = convert_to_rmsnorm(model)(input_ids=ids, output_hidden_states=True).hidden_states[:-1]
        crms = convert_to_crmsnorm(model)(input_ids=ids, output_hidden_states=True).hidden_states[:-1]
    width = original[0].shape[-1]
    assert original[0].mean(-1).abs().max() > 0.1  # the original stream does carry a mean
    for x, r, c in zip(original, rms, crms, strict=True):
        centered = x - x.mean(-1, keepdim=True)
        torch.testing.assert_close(r, centered, rtol=0, atol=1e-12)
        assert c.shape[-1] == width - 1
        torch.testing.assert_close(c, centered[..., :-1], rtol=0, atol=1e-12)


def test_centering_is_what_makes_it_exact():
    """Swapping each LayerNorm for ``g * RMSNorm(x) + b`` without centering the stream changes
    the logits a lot: the equivalence above is not an accident of the tiny models."""

    class AffineRMS(nn.Module):
        def __init__(self, ln: nn.LayerNorm):
            super().__init__()
            self.ln = ln

        def forward(self, x):
            return self.ln.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.ln.eps) + self.ln.bias

    model = _tiny("gpt2", torch.float64)
    ids = random_ids(2, 12)
    reference = _logits(model, ids)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.LayerNorm):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, AffineRMS(module))
    assert (_logits(model, ids) - reference).abs().max().item() > 1e-3


def test_norm_formulas():
    """RMSNorm equals unit-gain LayerNorm on zero-mean rows; CRMSNorm of the first d-1
    coordinates equals RMSNorm of the full vector (x_d = -sum) without its last coordinate."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 16, generator=gen, dtype=torch.float64) * 3
    x = x - x.mean(-1, keepdim=True)
    layer_norm = nn.LayerNorm(16, eps=1e-5, elementwise_affine=False).double()
    torch.testing.assert_close(RMSNorm(16, 1e-5)(x), layer_norm(x), rtol=0, atol=1e-12)
    z = x[..., :-1]
    full = torch.cat([z, -z.sum(-1, keepdim=True)], -1)
    by_hand = full / torch.sqrt(full.pow(2).sum(-1, keepdim=True) / 16 + 1e-5)
    torch.testing.assert_close(CRMSNorm(16, 1e-5)(z), by_hand[..., :-1], rtol=0, atol=1e-12)


def test_original_untouched_and_head_untied():
    model = _tiny("gpt2", torch.float64)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_to_rmsnorm(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert converted.lm_head.weight.data_ptr() != converted.transformer.wte.weight.data_ptr()
    assert converted.config.tie_word_embeddings is False
    # the final LayerNorm's bias b became the head's bias W_head b
    expected_bias = before["lm_head.weight"] @ before["transformer.ln_f.bias"]
    torch.testing.assert_close(converted.lm_head.bias, expected_bias, rtol=0, atol=1e-12)


def test_inplace_converts_the_given_model():
    model = _tiny("gpt_neox", torch.float64)
    assert convert_to_crmsnorm(model, inplace=True) is model
    assert _count(model, nn.LayerNorm) == 0


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("family", "overrides", "phrase"),
    [
        ("bert", {}, "Post-LN"),
        ("opt", {"do_layer_norm_before": False}, "Post-LN"),
        ("llama", {}, "already uses RMSNorm"),
        ("gemma2", {}, "already uses RMSNorm"),
        ("depthprobe_lm", {"norm_type": "rms"}, "already uses RMSNorm"),
        ("depthprobe_lm", {"norm_placement": "peri"}, "is not Pre-LN"),
    ],
)
def test_refuses_non_pre_ln(family, overrides, phrase):
    model = build_tiny(family, **overrides)
    with pytest.raises(depthprobe.DepthprobeError, match=phrase):
        convert_to_rmsnorm(model)


def test_refuses_twice_and_unknown_target():
    converted = convert_to_rmsnorm(build_tiny("gpt2"))
    with pytest.raises(depthprobe.DepthprobeError, match="already converted to rmsnorm"):
        convert_to_crmsnorm(converted)
    with pytest.raises(depthprobe.DepthprobeError, match="unknown target norm"):
        convert(build_tiny("gpt2"), "layernorm")


def _run(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what fixtures printed (e.g. transformers' save progress)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_cli_refusal_exits_2(family, tiny_dir, tmp_path, capsys):
    code, _, err = _run(["convert", str(tiny_dir(family)), "--to", "rmsnorm", "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert not (tmp_path / "o").exists()


def test_cli_refuses_post_ln_opt_and_full_out(tmp_path, tiny_dir, capsys):
    post = save_tiny("opt", tmp_path / "opt-post", do_layer_norm_before=False)
    code, _, err = _run(["convert", str(post), "--to", "crmsnorm", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "do_layer_norm_before=False is Post-LN" in err
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("precious")
    code, _, err = _run(["convert", str(tiny_dir("gpt2")), "--to", "rmsnorm", "--out", str(full)], capsys)
    assert code == 2 and "not empty" in err
    assert (full / "keep.txt").read_text() == "precious"


# ---------------------------------------------------------------------------- CLI and reload
@pytest.mark.parametrize(
    ("family", "kind"),
    [("gpt2", "crmsnorm"), ("opt", "rmsnorm"), ("gpt_neox", "crmsnorm"), ("depthprobe_lm", "crmsnorm")],
)
def test_cli_writes_a_folder_that_reloads_with_same_logits(family, kind, tiny_dir, tmp_path, capsys):
    out = tmp_path / "converted"
    code, stdout, _ = _run(["convert", str(tiny_dir(family)), "--to", kind, "--out", str(out), "--check"], capsys)
    assert code == 0
    assert "max |delta logit| = " in stdout and "OK" in stdout
    original, _ = depthprobe.load_model(tiny_dir(family), device="cpu")
    reloaded, _ = depthprobe.load_model(out, device="cpu")
    assert _count(reloaded, nn.LayerNorm) == 0
    assert _count(reloaded, RMSNorm if kind == "rmsnorm" else CRMSNorm) == _count(original, nn.LayerNorm)
    ids = random_ids(2, 16)
    reference = _logits(original, ids)
    assert (_logits(reloaded, ids) - reference).abs().max().item() <= 1e-4 * reference.abs().max().item()


def test_cli_check_fp64_prints_the_measured_delta(tiny_dir, tmp_path, capsys):
    out = tmp_path / "rms64"
    argv = ["convert", str(tiny_dir("gpt2")), "--to", "rmsnorm", "--out", str(out), "--check", "--dtype", "float64"]
    code, stdout, _ = _run(argv, capsys)
    assert code == 0
    printed = float(stdout.split("max |delta logit| = ")[1].split()[0])
    original, tok = depthprobe.load_model(tiny_dir("gpt2"), device="cpu", dtype="float64")
    reloaded, _ = depthprobe.load_model(out, device="cpu", dtype="float64")
    windows = depthprobe.make_windows(tok, num_sequences=2, seq_len=128)
    measured = (_logits(reloaded, windows.input_ids) - _logits(original, windows.input_ids)).abs().max().item()
    assert printed <= 1e-10
    assert printed == pytest.approx(measured, rel=1e-3, abs=1e-300)


def test_analyze_runs_on_converted_folder(tiny_dir, tmp_path, capsys):
    out = tmp_path / "crms"
    code, _, _ = _run(["convert", str(tiny_dir("gpt2")), "--to", "crmsnorm", "--out", str(out)], capsys)
    assert code == 0
    kwargs = dict(metrics="angular,variance,lens", num_sequences=2, seq_len=16, progress=False)
    original = depthprobe.analyze(*depthprobe.load_model(tiny_dir("gpt2"), device="cpu"), **kwargs)
    converted = depthprobe.analyze(*depthprobe.load_model(out, device="cpu"), **kwargs)
    assert len(converted.layers) == len(original.layers) == 4
    # same logits -> same loss; the lens at the last block is the model's own output
    assert converted.summary["base_loss"] == pytest.approx(original.summary["base_loss"], rel=1e-5)
    last_lens = converted.layers["logit_lens_loss"].iloc[-1]
    assert last_lens == pytest.approx(converted.summary["base_loss"], rel=1e-5)
