"""How much of SmolLM2's held-out loss gap does training-free repair (and a short LoRA heal) recover?

For each strategy (block, greedy) and K (4, 6, 8): the blocks that ``depthprobe prune``
removes (read from its committed curve, ``reports/deep_layers_smollm2/prune_curve.csv``,
chosen on 4 built-in windows of 256 tokens), then on held-out windows (the built-in text's
tail, never touched by the fit; ``evaluate.heldout.heldout_loss``, as ``prune`` scores):

    full       loss of the 30-block model
    removed    loss with the K blocks removed
    repaired   loss after ``repair_linear`` (maps fit on the first windows of the built-in
               text at each ridge of the grid; the last 20% of them validate each span and keep
               the best map, or decline it)
    recovered  (removed - repaired) / (removed - full)

``--methods linear,cosine`` measures both; each row says which map each span kept.
With ``--heal-cpu-seconds S`` the ``--heal-strategy`` model at ``--heal-k`` is repaired and
then healed with LoRA (rank 8, MLPs beside the seam) for at most S seconds of process CPU
time on the first half of the built-in text (the cloze items come from its second half), and the built-in cloze task
(lm-eval, ``--cloze-limit`` items) is scored on the plain, repaired and healed models.
Writes ``repair.csv`` (and ``heal.csv``, ``heal_cloze.csv``) under ``--out``; ``--collect``
merges the ``repair.csv`` of every run folder under ``--out`` into ``summary.csv``.

    nice -n 5 python analyses/repair_smollm2.py --fit-windows 40 --heldout-windows 16 --methods linear,cosine
    nice -n 5 python analyses/repair_smollm2.py --methods "" --heal-cpu-seconds 300 --cloze-limit 100
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import pandas as pd
import torch

import depthprobe
from depthprobe.data import builtin_text, heldout_windows, make_windows
from depthprobe.evaluate.cloze import CONTEXT_WORDS, TASK_NAME
from depthprobe.evaluate.harness import evaluate_model, resolve_tasks, retention, task_manager
from depthprobe.evaluate.heldout import heldout_loss
from depthprobe.model.stack import LayerStack
from depthprobe.prune import HealConfig, RepairConfig, heal_lora, remove_blocks, repair_linear
from depthprobe.prune.repair import removed_spans

ROOT = Path(__file__).resolve().parents[1]
CURVE = ROOT / "reports" / "deep_layers_smollm2" / "prune_curve.csv"


def picks(strategies, ks) -> dict[tuple[str, int], list[int]]:
    curve = pd.read_csv(CURVE).set_index(["strategy", "num_removed"])
    return {(s, k): [int(i) for i in str(curve.loc[(s, k), "removed"]).split(";")] for s in strategies for k in ks}


def measure(model, chosen, fit, heldout, methods, out_dir, batch_size=4, after=False) -> pd.DataFrame:
    full = heldout_loss(model, heldout, (), batch_size)
    rows = []
    for (strategy, k), removed in chosen.items():
        plain = heldout_loss(model, heldout, removed, batch_size)
        for method in methods:
            start = time.process_time()
            config = RepairConfig(method=method, batch_size=batch_size, after=after)
            result = repair_linear(model, removed, fit, config, progress=True)
            repaired = heldout_loss(model, heldout, removed, batch_size) if result.maps else plain
            result.restore()
            rows.append({"strategy": strategy, "K": k, "removed": ";".join(map(str, removed)),
                         "method": method + (" + after" if after else ""),
                         "fit_tokens": int(result.table["fit_tokens"].max()),
                         "heldout_tokens": int(heldout.input_ids.numel()), "heldout_full": full,
                         "heldout_removed": plain, "heldout_repaired": repaired,
                         "recovered": (plain - repaired) / (plain - full),
                         "spans_repaired": f"{len(result.maps)}/{len(removed_spans(removed))}",
                         "maps": "; ".join(f"{r.start}-{r.stop - 1} {r.side}: {r.map if r.applied else 'declined'}"
                                           for r in result.table.itertuples()),
                         "cpu_s": time.process_time() - start})
            print(rows[-1], flush=True)
            pd.DataFrame(rows).to_csv(out_dir / "repair.csv", index=False, float_format="%.6f")
    return pd.DataFrame(rows)


def cloze(models: dict, tok, limit: int):
    spec = resolve_tasks(TASK_NAME)
    manager = task_manager(spec)
    outputs = [evaluate_model(m, tok, spec, label=label, limit=limit, batch_size=16, manager=manager)
               for label, m in models.items()]
    table = pd.concat([o.table for o in outputs]).query("metric == 'acc'")
    kept = retention(outputs)
    return table, kept[kept.metric == "acc"] if not kept.empty else kept


def first_half_windows(tok, seq_len: int):
    """Healing text: windows of the built-in text's first half, which neither the cloze items (made
    from its second half, contexts included) nor the held-out tail touch; 4 windows of margin."""
    words = builtin_text().split()
    head = " ".join(words[: len(words) // 2 - CONTEXT_WORDS])
    return make_windows(tok, num_sequences=len(tok(head)["input_ids"]) // seq_len - 4, seq_len=seq_len)


def heal_once(model, tok, removed, fit, heldout, args, out_dir):
    """K blocks removed (plain copy), repaired, then healed; held-out loss and cloze accuracy of each."""
    full = heldout_loss(model, heldout, ())
    plain_model = copy.deepcopy(model)
    remove_blocks(LayerStack.from_model(plain_model), removed)
    plain = heldout_loss(plain_model, heldout)
    repair = repair_linear(model, removed, fit, RepairConfig(method=args.heal_repair))
    remove_blocks(LayerStack.from_model(model), removed)
    repaired = heldout_loss(model, heldout)
    repaired_model = copy.deepcopy(model)
    train = first_half_windows(tok, heldout.seq_len)
    heldout_windows(tok, num_sequences=heldout.num_sequences, seq_len=heldout.seq_len, calibration=train)
    seams = [stop - sum(1 for i in removed if i < stop) for _, stop in removed_spans(removed)]
    start = time.process_time()
    heal = HealConfig(steps=args.heal_steps, rank=8, lr=1e-3, batch_size=2, max_cpu_seconds=args.heal_cpu_seconds)
    result = heal_lora(model, train, seams, heal, progress=True)
    spent = time.process_time() - start
    healed = heldout_loss(model, heldout)
    gap = plain - full
    row = {"removed": ";".join(map(str, removed)), "repair": args.heal_repair,
           "repair_maps": "; ".join(str(v) for v in repair.table["map"]), "heldout_full": full,
           "heldout_removed": plain, "heldout_repaired": repaired, "heldout_healed": healed,
           "recovered_repaired": (plain - repaired) / gap, "recovered_healed": (plain - healed) / gap,
           "heal_steps": len(result.losses), "heal_tokens": len(result.losses) * heal.batch_size * heldout.seq_len,
           "heal_cpu_s": spent}
    print(row, flush=True)
    pd.DataFrame([row]).to_csv(out_dir / "heal.csv", index=False, float_format="%.6f")
    result.losses.to_csv(out_dir / "heal_losses.csv", index=False, float_format="%.6f")
    if args.cloze_limit:
        acc, kept = cloze({"removed": plain_model, "repaired": repaired_model, "healed": model}, tok, args.cloze_limit)
        acc.to_csv(out_dir / "heal_cloze.csv", index=False, float_format="%.6f")
        kept.to_csv(out_dir / "heal_cloze_paired.csv", index=False, float_format="%.6f")
        print(acc.to_string(index=False), kept.to_string(index=False), flush=True)


def collect(out_dir: Path) -> pd.DataFrame:
    """Every ``repair.csv`` under ``out_dir`` (one folder per run) in one table, ``summary.csv``."""
    frames = [pd.read_csv(f).assign(run=f.parent.name) for f in sorted(out_dir.glob("*/repair.csv"))
              if f.parent.name != "earlier"]
    table = pd.concat(frames).sort_values(["strategy", "K", "method"])
    table.to_csv(out_dir / "summary.csv", index=False, float_format="%.6f")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit-windows", type=int, default=40)
    parser.add_argument("--heldout-windows", type=int, default=16)
    parser.add_argument("--methods", default="linear,cosine")
    parser.add_argument("--ks", default="4,6,8")
    parser.add_argument("--strategies", default="block,greedy")
    parser.add_argument("--heal-cpu-seconds", type=float, default=0)
    parser.add_argument("--heal-steps", type=int, default=400)
    parser.add_argument("--heal-k", type=int, default=6)
    parser.add_argument("--heal-strategy", default="block")
    parser.add_argument("--heal-repair", default="linear")
    parser.add_argument("--cloze-limit", type=int, default=100)
    parser.add_argument("--after", action="store_true", help="also a map after each span (RepairConfig.after)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "reports" / "repair_smollm2"))
    parser.add_argument("--collect", action="store_true", help="only merge the runs under --out into summary.csv")
    args = parser.parse_args()
    if args.collect:
        print(collect(Path(args.out)).to_string(index=False))
        return
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok = depthprobe.load_model("smollm2", dtype="float32", device="cpu")
    model.eval()
    fit = make_windows(tok, num_sequences=args.fit_windows, seq_len=256)
    heldout = heldout_windows(tok, num_sequences=args.heldout_windows, seq_len=256, calibration=fit)
    methods = [m for m in args.methods.split(",") if m]
    if methods:
        chosen = picks(args.strategies.split(","), [int(k) for k in args.ks.split(",")])
        measure(model, chosen, fit, heldout, methods, out_dir, after=args.after)
        (out_dir / "repair_run.json").write_text(json.dumps({**vars(args), "heldout": heldout.source}, indent=2))
    if args.heal_cpu_seconds > 0:
        removed = picks([args.heal_strategy], [args.heal_k])[(args.heal_strategy, args.heal_k)]
        heal_once(model, tok, removed, fit, heldout, args, out_dir)
        (out_dir / "heal_run.json").write_text(json.dumps({**vars(args), "heldout": heldout.source}, indent=2))


if __name__ == "__main__":
    main()
