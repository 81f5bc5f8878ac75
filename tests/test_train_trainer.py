"""The trainer: schedule, data order, diagnostics, exact resume, divergence, DDP, CLI."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import depthprobe
from depthprobe.cli import main
from depthprobe.train.data import DataConfig, TokenData, byte_tokenizer, load_data, token_stream
from depthprobe.train.model import PRESETS, ModelConfig, build_model, rotary
from depthprobe.train.trainer import CHECKPOINT, TrainConfig, Trainer, lr_factor

REPO = Path(__file__).resolve().parents[1]
MODEL = ModelConfig(**PRESETS["tiny"], norm_placement="mix", mix_alpha=0.5)
DATA = DataConfig(max_tokens=40_000, val_windows=4)


def small(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=4, seq_len=32, warmup_steps=2, eval_every=3, diag_every=3, ckpt_every=3, device="cpu")
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def data():
    return load_data(DATA, seq_len=32, seed=0)


def test_lr_schedule_warmup_then_cosine_to_a_tenth():
    cfg = TrainConfig(steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert [lr_factor(s, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, cfg) == pytest.approx(0.1)


def test_data_order_is_fixed_by_seed_and_validation_is_held_out():
    ids, _ = token_stream(DATA, byte_tokenizer())
    assert ids.numel() == DATA.max_tokens and int(ids.min()) >= 3 and int(ids.max()) < 259
    a, b, c = TokenData(ids, 32, 0, 4), TokenData(ids, 32, 0, 4), TokenData(ids, 32, 1, 4)
    assert torch.equal(a.batch(5, 4), b.batch(5, 4))
    assert not torch.equal(a.batch(5, 4), c.batch(5, 4))
    assert torch.equal(a.batch(5, 4, slice(2, 4)), a.batch(5, 4)[2:])
    # one epoch visits every training window exactly once, then the next epoch reshuffles
    n = a.num_train_windows
    seen = torch.cat([a.batch(s, 1) for s in range(n)])
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, a.train.tolist()))
    assert not torch.equal(torch.cat([a.batch(s, 1) for s in range(n, 2 * n)]), seen)
    # validation windows are spread over the stream and never trained on
    windows = ids[: (ids.numel() // 32) * 32].view(-1, 32)
    val_at = [next(i for i in range(len(windows)) if torch.equal(windows[i], v)) for v in a.val]
    assert a.val.shape == (4, 32) and val_at[-1] > len(windows) // 2
    train_rows = set(map(tuple, a.train.tolist()))
    assert not any(tuple(r) in train_rows for r in a.val.tolist())


def test_diagnostics_match_a_direct_computation(data):
    trainer = Trainer(MODEL, small(steps=1), DATA, None, data=data, progress=False)
    result = trainer.fit()
    rows = result.layers[result.layers.step == 1].set_index("layer")
    assert list(rows.index) == [0, 1, 2, 3]

    model = build_model(trainer.model_config, 0)  # same seed: the same initial weights
    ids = data[0].batch(0, 4)
    cfg = trainer.model_config
    h = model.model.embed_tokens(ids).detach()
    rope = rotary(cfg.head_dim, cfg.rope_theta, 32, h.device)
    for layer, block in enumerate(model.model.layers):
        with torch.no_grad():
            out = block(h, rope)
        variance = out.double().var(-1, unbiased=False).mean()
        cos = torch.nn.functional.cosine_similarity(h.double(), out.double(), dim=-1).clamp(-1, 1)
        assert rows.loc[layer, "activation_variance"] == pytest.approx(float(variance), rel=1e-5)
        assert rows.loc[layer, "angular_distance"] == pytest.approx(float((cos.arccos() / math.pi).mean()), rel=1e-5)
        h = out.detach()
    model(input_ids=ids, labels=ids).loss.backward()
    for layer, block in enumerate(model.model.layers):
        g = torch.cat([p.grad.flatten() for p in block.parameters() if p.grad is not None])
        attn = torch.cat([p.grad.flatten() for p in block.self_attn.parameters()] + [
            p.grad.flatten() for n in ("attn_norm_in", "attn_norm_post") for p in getattr(block, n).parameters()
        ])  # fmt: skip
        assert rows.loc[layer, "grad_norm"] == pytest.approx(float(g.norm()), rel=1e-4)
        assert rows.loc[layer, "grad_norm_attn"] == pytest.approx(float(attn.norm()), rel=1e-4)
    assert result.metrics.grad_norm[0] == pytest.approx(
        float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm()), rel=1e-4
    )


def test_resume_equals_an_uninterrupted_run(tmp_path, data):
    whole = Trainer(MODEL, small(), DATA, tmp_path / "whole", data=data, progress=False).fit()
    first = Trainer(MODEL, small(), DATA, tmp_path / "cut", data=data, progress=False).fit(stop_at=3)
    assert first.steps_done == 3
    resumed_trainer = Trainer(MODEL, small(), DATA, tmp_path / "cut", resume=True, data=data, progress=False)
    assert resumed_trainer.step == 3
    resumed = resumed_trainer.fit()
    assert resumed.metrics.train_loss.tolist() == whole.metrics.train_loss.tolist()
    assert resumed.final_val_loss == whole.final_val_loss
    assert resumed.layers.equals(whole.layers)
    a = torch.load(tmp_path / "whole" / CHECKPOINT, weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    on_disk = pd.read_csv(tmp_path / "cut" / "metrics.csv")
    assert on_disk.step.tolist() == [1, 2, 3, 4, 5, 6]


def test_resume_reads_a_checkpoint_from_before_a_new_model_field(tmp_path, data):
    """A checkpoint written before a ModelConfig field existed (here: the DyT embedding-scalar
    init) resumes when the field is at its default, and is refused when it is not."""
    Trainer(MODEL, small(), DATA, tmp_path / "old", data=data, progress=False).fit(stop_at=3)
    path = tmp_path / "old" / CHECKPOINT
    state = torch.load(path, weights_only=True)
    del state["config"]["model"]["dyt_embed_scale_init"]
    torch.save(state, path)
    assert Trainer(MODEL, small(), DATA, tmp_path / "old", resume=True, data=data, progress=False).step == 3
    other = ModelConfig(**{**MODEL.__dict__, "dyt_embed_scale_init": 3.0})
    with pytest.raises(depthprobe.DepthprobeError, match="another model or seed"):
        Trainer(other, small(), DATA, tmp_path / "old", resume=True, data=data, progress=False)


def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint_and_resumes_exactly(tmp_path, data):
    whole = Trainer(MODEL, small(), DATA, tmp_path / "whole", data=data, progress=False).fit()
    trainer = Trainer(MODEL, small(ckpt_every=100), DATA, tmp_path / "cut", data=data, progress=False)
    real_step = trainer._train_step

    def step_then_ctrl_c():  # Ctrl-C arrives in the middle of step 3
        row = real_step()
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return row

    trainer._train_step = step_then_ctrl_c
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN in a pytest-xdist worker
    with pytest.raises(depthprobe.DepthprobeError, match="after step 3.*--resume"):
        trainer.fit()
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    assert torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)["step"] == 3
    resumed = Trainer(MODEL, small(), DATA, tmp_path / "cut", resume=True, data=data, progress=False).fit()
    assert resumed.metrics.train_loss.tolist() == whole.metrics.train_loss.tolist()
    assert resumed.final_val_loss == whole.final_val_loss


def test_nan_loss_marks_diverged_and_keeps_last_checkpoint(tmp_path, data):
    trainer = Trainer(MODEL, small(steps=8, ckpt_every=2), DATA, tmp_path, data=data, progress=False)

    def poison(module, args, output):  # the loss of step 5 (0-based 4) is NaN
        return output * math.nan if trainer.step >= 4 else output

    trainer.model.lm_head.register_forward_hook(poison)
    result = trainer.fit()
    assert result.diverged and result.steps_done == 4 and math.isnan(result.final_val_loss)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["step"] == 4
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in state["model"].items())
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert metrics.step.tolist() == [1, 2, 3, 4, 5] and math.isnan(metrics.train_loss.iloc[-1])
    assert metrics.train_loss.iloc[:4].notna().all()
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["diverged"] is True and run["steps_done"] == 4 and run["model_saved"] is True


def _cli_train(out: Path, extra: list[str]) -> list[str]:
    return [
        "train", "--norm", "peri", "--preset", "tiny", "--steps", "3", "--seed", "1", "--batch-size", "4",
        "--seq-len", "32", "--max-tokens", "40000", "--val-windows", "4", "--eval-every", "1", "--diag-every", "2",
        "--warmup", "1", "--device", "cpu", "--no-report", "-q", "--out", str(out), *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "depthprobe", *_cli_train(tmp_path / "one", [])], env=env, capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "-m",
         "depthprobe", *_cli_train(tmp_path / "two", [])],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = pd.read_csv(tmp_path / "one" / "metrics.csv"), pd.read_csv(tmp_path / "two" / "metrics.csv")
    assert len(a) == len(b) == 3
    for col in ("train_loss", "val_loss", "grad_norm"):
        assert a[col].tolist() == pytest.approx(b[col].tolist(), abs=1e-5, rel=1e-5)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_cli_train_writes_a_run_that_analyze_loads(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(_cli_train(out, []))
    assert exit_info.value.code == 0
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics.columns) == ["step", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s"]
    layers = pd.read_csv(out / "train_layers.csv")
    assert sorted(set(layers.step)) == [1, 2, 3] and len(layers) == 3 * 4
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["norm_placement"] == "peri" and config["train"]["seed"] == 1
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", str(out / "model"), "--num-sequences", "2", "--seq-len", "32", "--device", "cpu",
              "--metrics", "angular,variance,grad,lens", "--no-report", "-q", "--out", str(tmp_path / "an")])  # fmt: skip
    assert exit_info.value.code == 0
    analysed = pd.read_csv(tmp_path / "an" / "layers.csv")
    assert analysed.layer.tolist() == [0, 1, 2, 3] and analysed.grad_norm.notna().all()
    summary = json.loads((tmp_path / "an" / "summary.json").read_text())
    assert summary["family"] == "depthprobe_lm" and summary["norm_placement"] == "peri"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mix-alpha", "2"], "mix-alpha"),
        (["--batch-size", "3", "--grad-accum", "2"], "batch-size 3"),
        (["--resume"], "no checkpoint.pt"),
        (["--steps", "0"], "--steps"),
    ],
)
def test_cli_train_bad_input_is_one_line_exit_2(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(_cli_train(tmp_path / "bad", extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error:") and message in err and len(err.splitlines()) == 1
