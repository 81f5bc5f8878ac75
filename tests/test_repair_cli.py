"""`depthprobe prune --repair/--heal` end to end: held-out losses, plain exports, one-line errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from depthprobe.cli import main
from depthprobe.data import builtin_text


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def _heldout_loss_by_hand(folder, tokenizer, num_sequences=16, seq_len=16):
    """Plain transformers on the exported folder, the last tokens of the built-in text."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer(builtin_text(), add_special_tokens=False)["input_ids"][-num_sequences * seq_len:]
    ids = torch.tensor(ids).view(num_sequences, seq_len)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                            reduction="none").view(num_sequences, -1)
    return model, float(nll.mean(1).mean())


def test_prune_repair_and_heal_export_reloads_and_reproduces_printed_loss(tiny_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    folder = tiny_dir("llama")
    out = tmp_path / "pruned"
    code, stdout, err = run_cli(
        ["prune", str(folder), "--num-layers", "2", "--strategy", "block", "--seq-len", "16", "--num-sequences", "4",
         "--repair", "linear", "--repair-windows", "40", "--repair-after", "--heal", "lora", "--heal-steps", "4", "--out", str(out),
         "--device", "cpu", "--quiet", "--no-report"],
        capsys,
    )
    assert code == 0, err
    info = json.loads((out / "prune.json").read_text())
    lines = [x for x in stdout.splitlines() if "held-out" in x]
    assert len(lines) == 1 and lines[0].startswith("held-out loss"), stdout  # one line for every held-out loss
    line = lines[0]
    assert f"healed {info['heldout_loss_healed']:.4f}" in line and f"repaired {info['heldout_loss_repaired']:.4f}" in line
    assert info["heldout_loss_full"] == info["heldout_loss_before"]  # one set of windows, one scoring
    model, loss = _heldout_loss_by_hand(out, AutoTokenizer.from_pretrained(out))
    assert loss == pytest.approx(info["heldout_loss_healed"], abs=1e-5)
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    original = set(_state_keys(folder))
    assert {k for k in model.state_dict()} <= original  # no extra module
    curve = pd.read_csv(out / "prune_curve.csv")
    block = curve[curve["strategy"] == "block"].set_index("num_removed")
    assert block.loc[2, "heldout_loss_repaired"] == pytest.approx(info["heldout_loss_repaired"], abs=1e-6)
    assert block.loc[2, "heldout_loss_plain"] == pytest.approx(info["heldout_loss_removed"], abs=1e-6)
    assert curve[curve["strategy"] != "block"]["heldout_loss_repaired"].isna().all()
    assert len(pd.read_csv(out / "heal_losses.csv")) == 4
    spans = pd.read_csv(out / "repair_spans.csv")
    assert list(spans["side"]) == ["before", "after"] and (spans["applied"] | spans["reason"].notna()).all()
    _check_report(out, info)


def _check_report(out, info):
    """The figure plots the CSV's numbers; the HTML report has the section."""
    from depthprobe.report import write_report
    from depthprobe.report.repair_figures import plot_repair_curve
    from depthprobe.results import load_run

    curve = pd.read_csv(out / "repair_curve.csv").sort_values("num_removed")
    ax = plot_repair_curve([load_run(out)]).axes[0]
    lines = {line.get_label().split(": ")[-1]: line.get_ydata() for line in ax.get_lines()}
    assert list(lines["blocks removed"]) == pytest.approx(list(curve["heldout_loss_plain"]))
    assert list(lines["repaired"]) == pytest.approx(list(curve["heldout_loss_repaired"]))
    assert list(lines["healed"]) == pytest.approx([info["heldout_loss_healed"]])
    write_report([out], out / "report.html")
    assert "Repair and healing" in (out / "report.html").read_text()


def _state_keys(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict().keys()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--repair", "quadratic"], "Invalid value for '--repair'"),
        (["--repair", "linear", "--repair-windows", "1"], "--repair-windows must be at least 2"),
        (["--heal", "lora", "--heal-steps", "0"], "--heal-steps"),
        (["--heal", "lora", "--heal-modules", "nope_proj"], "matches no linear layer"),
        (["--heal", "lora", "--heal-text-file", "missing.txt"], "text file not found"),
    ],
)
def test_repair_heal_bad_input_is_one_line(args, message, tiny_dir, tmp_path, capsys):
    code, _, err = run_cli(["prune", str(tiny_dir("llama")), "--remove", "2", "--no-curve", "--seq-len", "16",
                            "--num-sequences", "2", "--out", str(tmp_path / "o"), "--quiet", "--no-report", *args],
                           capsys)
    assert code == 2 and message in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_smollm2_repaired_export_reproduces_printed_loss(tmp_path, smollm2, capsys):
    """A real repair (the map is kept on SmolLM2): the export reloads with plain transformers,
    has 28 blocks and no extra module, and its held-out loss is the printed one to 1e-5."""
    out = tmp_path / "smol-repaired"
    code, stdout, err = run_cli(
        ["prune", "smollm2", "--remove", "20,21", "--no-curve", "--num-sequences", "1", "--seq-len", "64",
         "--repair", "linear", "--repair-windows", "48", "--out", str(out), "--quiet", "--no-report",
         "--device", "cpu"],
        capsys,
    )
    assert code == 0, err
    info = json.loads((out / "prune.json").read_text())
    spans = pd.read_csv(out / "repair_spans.csv")
    assert spans["applied"].all(), spans
    assert info["heldout_loss_repaired"] < info["heldout_loss_removed"]
    printed = float(stdout.split("repaired ")[1].split()[0])
    model, loss = _heldout_loss_by_hand(out, smollm2[1], num_sequences=16, seq_len=64)
    assert loss == pytest.approx(printed, abs=1e-5)
    assert model.config.num_hidden_layers == 28
    assert set(model.state_dict()) <= set(smollm2[0].state_dict())


def test_heal_refuses_an_encoder(tiny_dir, tmp_path, capsys):
    code, _, err = run_cli(["prune", str(tiny_dir("bert")), "--remove", "2", "--no-curve", "--seq-len", "16",
                            "--num-sequences", "2", "--out", str(tmp_path / "o"), "--quiet", "--no-report",
                            "--heal", "lora"], capsys)
    assert code == 2 and "needs a causal LM" in err
