"""The tuned lens: tuned-lens's optimiser step by hand, readouts equal to formulas on the
model's own hidden states, the folder format both ways, resume, the held-out guard, and the
per-position table ``lens_tokens.csv``."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import depthprobe
from depthprobe.data import Windows
from depthprobe.errors import DepthprobeError
from depthprobe.probes.lens_train import (
    LENS_RESERVED_TOKENS,
    LensTrainConfig,
    LensTrainer,
    lens_text,
    micro_batch_kl,
    step_windows,
)
from depthprobe.probes.tuned_lens import TunedLens, load_lens, save_lens
from tests.tiny_models import build_tiny, random_ids, tiny_tokenizer


@pytest.fixture(scope="module")
def llama():
    return build_tiny("llama")


def _text(config):
    return lens_text(tiny_tokenizer(), config)


def test_one_step_is_tuned_lens_sgd_by_hand(llama):
    """Step 1 from zero: g = sum_i dKL_i/dtheta (clipped to norm 1); Nesterov SGD with an empty
    buffer moves theta by -lr (1 + momentum) (g + wd theta) = -lr (1 + m) g at theta = 0."""
    stack = depthprobe.LayerStack.from_model(llama)
    config = LensTrainConfig(steps=4, num_sequences=2, seq_len=16, batch_size=1, precision="fp32")
    text = _text(config)
    trainer = LensTrainer(stack, text, config)
    ids = text.input_ids[step_windows(0, config, len(text.input_ids))]
    ref = TunedLens(32, 4)
    micro_batch_kl(stack, ref, ids, 1.0)  # both windows in one batch: the same mean
    grads = [p.grad.clone() for p in ref.parameters()]
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    scale = min(1.0, 1.0 / (norm + 1e-6))
    trainer.fit(progress=False, stop_at=1)
    for p, g in zip(trainer.lens.parameters(), grads, strict=False):
        np.testing.assert_allclose(p.detach(), -0.1 * 1.9 * scale * g, rtol=1e-4, atol=1e-9)
    assert trainer.sched.get_last_lr()[0] == pytest.approx(0.1 * 3 / 4)  # linear decay, no warmup


def test_readouts_equal_formulas_on_hidden_states(llama, tmp_path):
    stack = depthprobe.LayerStack.from_model(llama)
    lens = TunedLens(32, 4)
    torch.manual_seed(1)
    with torch.no_grad():
        for t in lens.translators:
            t.weight.normal_(0, 0.05)
            t.bias.normal_(0, 0.05)
    save_lens(lens, tmp_path, stack, {"text": {"source": "elsewhere"}})
    ids = random_ids(3, 12)
    result = depthprobe.analyze(llama, windows=Windows(ids, "r"), metrics="lens,tuned-lens", batch_size=2,
                                progress=False, options={"lens": str(tmp_path)})
    with torch.no_grad():
        out = llama(input_ids=ids, output_hidden_states=True, use_cache=False)
        p = F.log_softmax(out.logits, -1)
        raw = list(out.hidden_states[1:-1])  # x_1..x_{L-1}; the last block's output is the model's own
        for layer in range(4):
            if layer < 3:
                h = raw[layer]
                plain = llama.lm_head(llama.model.norm(h))
                tuned = llama.lm_head(llama.model.norm(h + lens.translators[layer + 1](h)))
            else:
                plain = tuned = out.logits
            for name, logits in (("logit_lens", plain), ("tuned_lens", tuned)):
                kl = (p.exp() * (p - F.log_softmax(logits, -1))).sum(-1).mean()
                assert result.layers[f"{name}_kl"][layer] == pytest.approx(float(kl), rel=1e-5, abs=1e-7)
            nll = F.cross_entropy(tuned[:, :-1].reshape(-1, tuned.shape[-1]), ids[:, 1:].reshape(-1))
            assert result.layers["tuned_lens_loss"][layer] == pytest.approx(float(nll), rel=1e-5)
    assert result.layers["tuned_lens_kl"].iloc[-1] == pytest.approx(0, abs=1e-6)


def test_folder_is_tuned_lens_format_and_loads_theirs(llama, tmp_path):
    stack = depthprobe.LayerStack.from_model(llama)
    lens = TunedLens(32, 4)
    with torch.no_grad():
        lens.translators[2].bias.fill_(0.5)
    save_lens(lens, tmp_path / "ours", stack)
    meta = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert {"base_model_name_or_path", "d_model", "num_hidden_layers", "bias", "unembed_hash"} <= set(meta)
    assert (meta["d_model"], meta["num_hidden_layers"], meta["lens_type"]) == (32, 4, "linear_tuned_lens")
    state = torch.load(tmp_path / "ours" / "params.pt", weights_only=True)
    assert sorted(state) == sorted(f"{i}.{k}" for i in range(4) for k in ("weight", "bias"))
    # a folder as tuned-lens's TunedLens.save writes it: layer_translators.state_dict(), its config
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    translators = torch.nn.ModuleList(torch.nn.Linear(32, 32) for _ in range(4))
    torch.save(translators.state_dict(), theirs / "params.pt")
    (theirs / "config.json").write_text(json.dumps({"base_model_name_or_path": "x", "d_model": 32,
                                                    "num_hidden_layers": 4, "bias": True, "unembed_hash": None,
                                                    "lens_type": "linear_tuned_lens"}))
    loaded, training = load_lens(theirs, stack)
    assert training == {}
    for a, b in zip(loaded.translators, translators, strict=False):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    other = depthprobe.LayerStack.from_model(build_tiny("llama", num_hidden_layers=2))
    with pytest.raises(DepthprobeError, match="train a lens for this model"):
        load_lens(theirs, other)


def test_resume_continues_exactly(llama, tmp_path):
    stack = depthprobe.LayerStack.from_model(llama)
    config = LensTrainConfig(steps=4, num_sequences=2, seq_len=16, batch_size=2, checkpoint_every=2)
    straight = LensTrainer(stack, _text(config), config, tmp_path / "a").fit(progress=False)
    first = LensTrainer(stack, _text(config), config, tmp_path / "b")
    first.fit(progress=False, stop_at=2)
    again = LensTrainer(stack, _text(config), config, tmp_path / "b")
    again.resume()
    assert again.step == 2
    resumed = again.fit(progress=False)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=False):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    rows = pd.read_csv(tmp_path / "b" / "lens_train.csv")
    assert sorted(rows.step.unique()) == [1, 2, 3, 4] and len(rows) == 16
    other = LensTrainConfig(steps=5, num_sequences=2, seq_len=16, batch_size=2)
    with pytest.raises(DepthprobeError, match="steps=4"):
        LensTrainer(stack, _text(other), other, tmp_path / "b").resume()


def test_heldout_text_is_never_the_training_text(llama, tmp_path):
    stack = depthprobe.LayerStack.from_model(llama)
    config = LensTrainConfig(steps=1, num_sequences=2, seq_len=16)
    text = _text(config)
    assert text.info["token_start"] == LENS_RESERVED_TOKENS
    trainer = LensTrainer(stack, text, config, tmp_path)
    trainer.fit(progress=False)
    tok = tiny_tokenizer()
    ok = depthprobe.make_windows(tok, num_sequences=2, seq_len=16)  # the built-in text's first tokens
    run = depthprobe.analyze(llama, tok, windows=ok, metrics="tuned-lens", progress=False, options={"lens": str(tmp_path)})
    assert "builtin tokens 32768" in run.summary["tuned_lens"]["trained_on"]
    # windows reaching past the reserved tokens into the training range are refused (here the
    # lens says it started at token 20: 2 windows of 16 reach token 32)
    info = json.loads((tmp_path / "lens_training.json").read_text())
    info["text"]["token_start"] = 20
    (tmp_path / "lens_training.json").write_text(json.dumps(info))
    with pytest.raises(DepthprobeError, match="trained on tokens 20"):
        depthprobe.analyze(llama, tok, windows=ok, metrics="tuned-lens", progress=False,
                           options={"lens": str(tmp_path)})
    with pytest.raises(DepthprobeError, match="trained the lens"):
        depthprobe.analyze(llama, windows=Windows(text.input_ids[:2], "copy"), metrics="tuned-lens", progress=False,
                           options={"lens": str(tmp_path)})


def test_lens_tokens_table_is_the_top_k_of_the_logit_lens(llama):
    ids = random_ids(2, 10)
    result = depthprobe.analyze(llama, tiny_tokenizer(), windows=Windows(ids, "r"), metrics="lens", progress=False,
                                options={"lens_positions": (0, -1), "lens_topk": 3})
    table = result.tables["lens_tokens"]
    assert list(table.columns) == ["window", "position", "layer", "rank", "token_id", "token", "prob"]
    assert len(table) == 2 * 2 * 4 * 3
    with torch.no_grad():
        out = llama(input_ids=ids, output_hidden_states=True)
        states = [*out.hidden_states[1:-1], None]
        for (w, pos, layer), rows in table.groupby(["window", "position", "layer"]):
            logits = out.logits if states[layer] is None else llama.lm_head(llama.model.norm(states[layer]))
            top = torch.softmax(logits[w, pos], -1).topk(3)
            assert rows["token_id"].tolist() == top.indices.tolist()
            np.testing.assert_allclose(rows["prob"], top.values.numpy(), rtol=1e-5)
            assert rows["rank"].tolist() == [1, 2, 3]
    assert set(table.position) == {0, 9}


def run_cli(args, capsys):
    from depthprobe.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code, capsys.readouterr().err


def test_cli_lens_train_then_analyze(tiny_dir, tmp_path, capsys):
    model = str(tiny_dir("llama"))
    lens = tmp_path / "lens"
    small = ["--num-sequences", "2", "--seq-len", "16"]
    code, err = run_cli(["lens", "train", model, "--steps", "2", *small, "--out", str(lens), "-q"], capsys)
    assert code == 0, err
    assert "Lens written" in err and (lens / "params.pt").is_file()
    out = tmp_path / "run"
    code, err = run_cli(["analyze", model, "--metrics", "lens,tuned-lens", "--lens", str(lens), "--lens-positions",
                         "0,-1", *small, "--out", str(out), "-q"], capsys)
    assert code == 0, err
    layers = pd.read_csv(out / "layers.csv")
    assert {"logit_lens_loss", "logit_lens_kl", "tuned_lens_loss", "tuned_lens_kl", "logit_lens_loss_mid"} <= set(layers)
    assert (out / "lens_tokens.csv").is_file() and "lens-heatmap" in (out / "report.html").read_text()
    for bad, says in ((["--lens-positions", "99"], "outside a window"), (["--lens", str(tmp_path / "none")], "no config")):
        code, err = run_cli(["analyze", model, "--metrics", "tuned-lens", *small, *bad], capsys)
        assert code == 2 and says in err and "Traceback" not in err
    code, err = run_cli(["lens", "train", model, "--steps", "2", *small, "--out", str(lens)], capsys)
    assert code == 2 and "--resume" in err


def test_without_a_lens_one_is_trained_first_and_said_so(llama):
    tok = tiny_tokenizer()
    run = depthprobe.analyze(llama, tok, windows=depthprobe.make_windows(tok, num_sequences=2, seq_len=16),
                             metrics="tuned-lens", progress=False)
    said = run.summary["tuned_lens"]
    assert said["lens_dir"] is None and said["steps"] == 10 and "builtin tokens 32768" in said["trained_on"]
    assert run.layers["tuned_lens_kl"].notna().all()


def test_encoder_has_no_tuned_lens():
    run = depthprobe.analyze(build_tiny("bert"), windows=Windows(random_ids(2, 8), "r"), metrics="angular,tuned-lens",
                             progress=False)
    assert "tuned_lens_kl" not in run.layers and not run.summary["nonfinite"]
    assert any(n.startswith("tuned_lens_kl: no tuned lens") for n in run.summary["notes"])
