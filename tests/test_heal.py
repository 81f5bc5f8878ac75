"""LoRA healing: the right modules, merged into plain weights, resumable exactly."""

from __future__ import annotations

import re

import pytest
import torch

from depthprobe.data import Windows
from depthprobe.errors import DepthprobeError
from depthprobe.prune.heal import CHECKPOINT, HealConfig, heal_lora, target_modules
from tests.tiny_models import build_tiny, random_ids


def _lm_loss(model, ids):
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids, use_cache=False).loss)


def test_default_targets_are_the_mlps_beside_each_seam():
    model = build_tiny("llama")
    names = target_modules(model, seams=[2])
    expected = [f"model.layers.{i}.mlp.{p}" for i in (1, 2) for p in ("down_proj", "gate_proj", "up_proj")]
    assert names == sorted(expected)
    assert target_modules(model, [2], "down_proj") == [f"model.layers.{i}.mlp.down_proj" for i in range(4)]
    with pytest.raises(DepthprobeError, match="matches no linear"):
        target_modules(model, [2], "nonexistent_proj")


def test_heal_lowers_training_loss_and_merges_into_plain_weights(tmp_path):
    """The merged weight equals W + (alpha/r)·B·A from the saved adapters; no LoRA module is
    left; the loss on the healing text went down."""
    model = build_tiny("llama")
    ids = random_ids(8, 16, seed=1)
    keys = set(model.state_dict())
    w0 = model.get_submodule("model.layers.1.mlp.down_proj").weight.detach().clone()
    before = _lm_loss(model, ids)
    config = HealConfig(steps=30, rank=4, alpha=8, lr=1e-2, batch_size=4, save_every=30)
    result = heal_lora(model, Windows(ids, "test"), seams=[2], config=config, checkpoint_dir=tmp_path, progress=False)
    assert set(model.state_dict()) == keys
    assert not any("lora" in n for n, _ in model.named_modules())
    assert _lm_loss(model, ids) < before - 0.05
    assert len(result.losses) == 30
    lora = torch.load(tmp_path / CHECKPOINT, weights_only=True)["lora"]
    a = next(v for k, v in lora.items() if "layers.1.mlp.down_proj.lora_A" in k)
    b = next(v for k, v in lora.items() if "layers.1.mlp.down_proj.lora_B" in k)
    merged = model.get_submodule("model.layers.1.mlp.down_proj").weight
    torch.testing.assert_close(merged, w0 + (8 / 4) * b @ a, atol=1e-6, rtol=1e-5)
    # a block far from the seam is untouched
    untouched = build_tiny("llama").get_submodule("model.layers.3.mlp.down_proj").weight
    assert torch.equal(model.get_submodule("model.layers.3.mlp.down_proj").weight, untouched)


def test_resume_continues_exactly(tmp_path):
    ids = random_ids(8, 16, seed=2)
    straight = build_tiny("llama")
    heal_lora(straight, Windows(ids, "t"), [2], HealConfig(steps=6, rank=2, lr=1e-2, save_every=3), progress=False)
    first = build_tiny("llama")
    heal_lora(first, Windows(ids, "t"), [2], HealConfig(steps=3, rank=2, lr=1e-2, save_every=3),
              checkpoint_dir=tmp_path, progress=False)
    # the checkpoint of a 3-step run has another `steps`: resuming a 6-step run from it is refused
    resumed = build_tiny("llama")
    with pytest.raises(DepthprobeError, match="other healing settings"):
        heal_lora(resumed, Windows(ids, "t"), [2], HealConfig(steps=6, rank=2, lr=1e-2, save_every=3),
                  checkpoint_dir=tmp_path, progress=False)
    # an interrupted 6-step run (checkpoint at step 3) resumes to the straight run's weights
    other = tmp_path / "b"
    interrupted = build_tiny("llama")
    config = HealConfig(steps=6, rank=2, lr=1e-2, save_every=3)
    calls = []

    def interrupt_at_step_5(module, args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt

    handle = interrupted.model.layers[0].register_forward_pre_hook(interrupt_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        heal_lora(interrupted, Windows(ids, "t"), [2], config, checkpoint_dir=other, progress=False)
    handle.remove()
    assert not any("lora" in n for n, _ in interrupted.named_modules())
    resumed = build_tiny("llama")
    result = heal_lora(resumed, Windows(ids, "t"), [2], config, checkpoint_dir=other, progress=False)
    assert result.resumed_from == 3
    for (name, got), want in zip(resumed.state_dict().items(), straight.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=name)


def test_default_healing_text_avoids_the_cloze_items_and_the_heldout_tail():
    """Built-in healing windows end before the first cloze item's context and before the held-out tail."""
    from depthprobe.data import builtin_text, heldout_windows
    from depthprobe.evaluate.cloze import cloze_items
    from depthprobe.prune.heal import training_windows
    from tests.tiny_models import tiny_tokenizer

    tok = tiny_tokenizer()
    train = training_windows(tok, seq_len=64, exclude_tail_tokens=16 * 64)
    heldout_windows(tok, num_sequences=16, seq_len=64, calibration=train)  # asserts disjoint token positions
    text = builtin_text()
    first = cloze_items()[0]["context"].split()
    where = re.search(r"\s+".join(re.escape(w) for w in first), text).start()  # the first cloze context
    before = tok(text[:where], add_special_tokens=False)["input_ids"]
    assert train.input_ids.numel() <= len(before)  # the windows are the stream's first tokens: all before it
    assert train.input_ids.flatten().tolist() == tok(text, add_special_tokens=False)["input_ids"][
        : train.input_ids.numel()]
