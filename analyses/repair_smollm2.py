"""How much of SmolLM2's held-out loss gap does training-free repair (and a short LoRA heal) recover?

For each strategy (block, greedy) and K (4, 6, 8): the blocks that ``depthprobe prune``
removes (read from its committed curve, ``reports/deep_layers_smollm2/prune_curve.csv``,
chosen on 4 built-in windows of 256 tokens), then on held-out windows (the built-in text's
tail, never touched by the fit):

    full       loss of the 30-block model
    removed    loss with the K blocks removed
    repaired   loss after ``repair_linear`` (maps fit on the first windows of the built-in
               text, the last 20% of them validating each span)
    recovered  (removed - repaired) / (removed - full)

With ``--heal-cpu-seconds S`` the K = 6 block model is also healed with LoRA for at most S
seconds of process CPU time. Writes ``reports/repair_smollm2/repair.csv`` (and ``heal.csv``).

    nice -n 5 python analyses/repair_smollm2.py --fit-windows 40 --heldout-windows 8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

import depthprobe
from depthprobe.data import heldout_windows, make_windows
from depthprobe.evaluate.heldout import heldout_loss
from depthprobe.model.stack import LayerStack
from depthprobe.prune import HealConfig, RepairConfig, heal_lora, remove_blocks, repair_linear
from depthprobe.prune.heal import training_windows
from depthprobe.prune.repair import removed_spans

ROOT = Path(__file__).resolve().parents[1]
CURVE = ROOT / "reports" / "deep_layers_smollm2" / "prune_curve.csv"


def picks(strategies, ks) -> dict[tuple[str, int], list[int]]:
    curve = pd.read_csv(CURVE).set_index(["strategy", "num_removed"])
    return {(s, k): [int(i) for i in str(curve.loc[(s, k), "removed"]).split(";")] for s in strategies for k in ks}


def measure(model, chosen, fit, heldout, config, out_dir):
    full = heldout_loss(model, heldout, (), config.batch_size)
    rows = []
    for (strategy, k), removed in chosen.items():
        start = time.process_time()
        plain = heldout_loss(model, heldout, removed, config.batch_size)
        result = repair_linear(model, removed, fit, config, progress=True)
        repaired = heldout_loss(model, heldout, removed, config.batch_size) if result.maps else plain
        result.restore()
        rows.append({"strategy": strategy, "K": k, "removed": ";".join(map(str, removed)), "method": config.method,
                     "heldout_full": full, "heldout_removed": plain, "heldout_repaired": repaired,
                     "recovered": (plain - repaired) / (plain - full),
                     "spans_repaired": f"{len(result.maps)}/{len(removed_spans(removed))}",
                     "cpu_s": time.process_time() - start})
        print(rows[-1], flush=True)
        pd.DataFrame(rows).to_csv(out_dir / f"repair_{config.method}.csv", index=False, float_format="%.6f")
    return pd.DataFrame(rows)


def heal_once(model, tok, removed, fit, heldout, config, cpu_seconds, steps, out_dir):
    """K blocks removed, repaired, then healed; held-out loss before and after."""
    stack = LayerStack.from_model(model)
    full = heldout_loss(model, heldout, (), config.batch_size)
    plain = heldout_loss(model, heldout, removed, config.batch_size)
    repair_linear(model, removed, fit, config)
    remove_blocks(stack, removed)
    repaired = heldout_loss(model, heldout, (), config.batch_size)
    train = training_windows(tok, seq_len=heldout.seq_len, exclude_tail_tokens=heldout.input_ids.numel())
    heldout_windows(tok, num_sequences=heldout.num_sequences, seq_len=heldout.seq_len, calibration=train)
    seams = [stop - sum(1 for i in removed if i < stop) for _, stop in removed_spans(removed)]
    start = time.process_time()
    heal = HealConfig(steps=steps, rank=8, lr=1e-3, batch_size=2, max_cpu_seconds=cpu_seconds)
    result = heal_lora(model, train, seams, heal, progress=True)
    spent = time.process_time() - start
    healed = heldout_loss(model, heldout, (), config.batch_size)
    row = {"removed": ";".join(map(str, removed)), "heldout_full": full, "heldout_removed": plain,
           "heldout_repaired": repaired, "heldout_healed": healed, "recovered_repaired": (plain - repaired) / (plain - full),
           "recovered_healed": (plain - healed) / (plain - full), "heal_steps": len(result.losses), "heal_cpu_s": spent}
    print(row, flush=True)
    pd.DataFrame([row]).to_csv(out_dir / "heal.csv", index=False, float_format="%.6f")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit-windows", type=int, default=40)
    parser.add_argument("--heldout-windows", type=int, default=8)
    parser.add_argument("--methods", default="linear")
    parser.add_argument("--ks", default="4,6,8")
    parser.add_argument("--strategies", default="block,greedy")
    parser.add_argument("--heal-cpu-seconds", type=float, default=0)
    parser.add_argument("--heal-steps", type=int, default=200)
    parser.add_argument("--out", default=str(ROOT / "reports" / "repair_smollm2"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok = depthprobe.load_model("smollm2", dtype="float32", device="cpu")
    fit = make_windows(tok, num_sequences=args.fit_windows, seq_len=256)
    heldout = heldout_windows(tok, num_sequences=args.heldout_windows, seq_len=256, calibration=fit)
    chosen = picks(args.strategies.split(","), [int(k) for k in args.ks.split(",")])
    for method in args.methods.split(","):
        if method:
            measure(model, chosen, fit, heldout, RepairConfig(method=method), out_dir)
    if args.heal_cpu_seconds > 0:
        heal_once(model, tok, chosen[("block", 6)], fit, heldout, RepairConfig(), args.heal_cpu_seconds,
                  args.heal_steps, out_dir)


if __name__ == "__main__":
    main()
