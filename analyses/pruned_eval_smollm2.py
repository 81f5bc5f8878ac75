"""Claim: a pruned model must be judged on text that did not choose its layers, on tasks,
and on real speed (ShortGPT, SLEB, Gromov et al.). How much of SmolLM2-135M survives greedy
removal of 2, 4, 6, 8 of its 30 blocks?

Greedy block removal is chosen on calibration windows (the start of the built-in text).
For each K the script removes the blocks for real (a copy of the model, blocks deleted) and
measures: calibration and held-out loss / perplexity (held-out = the end of the built-in
text, asserted disjoint from the calibration windows) with 95% bootstrap intervals over
windows; accuracy on the built-in cloze task through lm-eval-harness and its retention
against the full model (paired bootstrap over items); and, for K = 6, prefill / decode
speed against the full model, measured in alternation in the same run.

Writes reports/pruned_eval_smollm2/: curve.csv, eval.csv, eval_samples.csv,
eval_retention.csv, bench.csv, bench_speedup.csv, pruned_eval.png, summary.json.

    nice -n 5 .venv/bin/python analyses/pruned_eval_smollm2.py [--limit 200] [--no-bench]
        [--order-from reports/deep_layers_smollm2/prune_curve.csv]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import depthprobe  # noqa: E402
from depthprobe.cli.parsing import parse_list  # noqa: E402
from depthprobe.data import heldout_windows  # noqa: E402
from depthprobe.evaluate.bench import BenchConfig, bench, speedups  # noqa: E402
from depthprobe.evaluate.cloze import TASK_NAME  # noqa: E402
from depthprobe.evaluate.harness import (  # noqa: E402
    EvalOutput,
    evaluate_model,
    resolve_tasks,
    retention,
    task_manager,
    write_eval,
)
from depthprobe.evaluate.heldout import mean_interval, per_window_loss  # noqa: E402
from depthprobe.prune import remove_blocks  # noqa: E402
from depthprobe.prune.select import Evaluator, greedy  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "reports" / "pruned_eval_smollm2"
KS = (0, 6, 8, 4, 2)  # measured in this order: the ends of the curve and the bench model first


def pruned_copy(model, removed):
    clone = copy.deepcopy(model)
    if removed:
        remove_blocks(depthprobe.LayerStack.from_model(clone), removed)
    return clone.eval()


def losses(model, calibration, held) -> dict:
    stack = depthprobe.LayerStack.from_model(model)
    out = {}
    for name, windows in (("calibration", calibration), ("heldout", held)):
        if windows is None:
            continue
        mean, lo, hi = mean_interval(per_window_loss(stack, windows))
        out |= {f"{name}_loss": mean, f"{name}_loss_low": lo, f"{name}_loss_high": hi}
    out |= {"heldout_perplexity": math.exp(out["heldout_loss"]),
            "heldout_perplexity_low": math.exp(out["heldout_loss_low"]),
            "heldout_perplexity_high": math.exp(out["heldout_loss_high"])}
    return out


def greedy_steps(args, model, calibration) -> tuple[dict[int, list[int]], dict[int, float]]:
    """Removed blocks and calibration loss per K: searched, or read from a committed curve."""
    if args.order_from:
        # the greedy steps of a committed run on the same calibration windows (saves the search)
        table = pd.read_csv(args.order_from, dtype={"removed": str}).query("strategy == 'greedy'")
        return ({int(r.num_removed): [int(v) for v in str(r.removed).split(";") if v not in ("", "nan")]
                 for r in table.itertuples(index=False)},
                {int(r.num_removed): float(r.loss) for r in table.itertuples(index=False)})
    search = greedy(Evaluator(depthprobe.LayerStack.from_model(model), calibration.input_ids), max(args.ks))
    return {s.num_removed: s.removed for s in search}, {s.num_removed: s.loss for s in search}


def measure(args) -> dict:
    t0 = time.time()
    model, tok = depthprobe.load_model("smollm2", device="cpu")
    calibration = depthprobe.make_windows(tok, num_sequences=args.num_sequences, seq_len=args.seq_len)
    held = heldout_windows(tok, num_sequences=args.heldout_sequences, seq_len=args.seq_len, calibration=calibration)
    steps, greedy_loss = greedy_steps(args, model, calibration)
    spec = resolve_tasks(TASK_NAME)
    manager = task_manager(spec)
    rows, outputs, models = [], [], {}
    args.out.mkdir(parents=True, exist_ok=True)
    for k in args.ks:
        removed = steps[k]
        pruned = pruned_copy(model, removed)
        row = {"num_removed": k, "num_layers": 30 - k, "removed": ";".join(map(str, removed)),
               "greedy_calibration_loss": greedy_loss[k],
               **losses(pruned, None if args.fast else calibration, held)}
        outputs.append(evaluate_model(pruned, tok, spec, label=f"K={k}", limit=args.limit, batch_size=16,
                                      manager=manager))
        rows.append(row)
        print(row, outputs[-1].table.to_dict("records"), f"{time.time() - t0:.0f} s", flush=True)
        write_curve(rows, outputs, args.out)  # after every K: an interrupted run keeps what it measured
        if k in (0, 6):
            models[f"SmolLM2 {30 - k} blocks"] = pruned
        if len(models) == 2 and not args.no_bench:
            run_bench(args, models)
            models = {}
    return {"calibration": calibration.source, "calibration_tokens": int(calibration.input_ids.numel()),
            "heldout": held.source, "heldout_tokens": int(held.input_ids.numel()), "cloze_items": args.limit,
            "greedy_order_from": args.order_from, "greedy_steps": {k: steps[k] for k in args.ks},
            "torch_threads": torch.get_num_threads(), "seconds": round(time.time() - t0, 1)}


def write_curve(rows: list[dict], outputs, out: Path | None = None) -> None:
    out = out or OUT
    curve = pd.DataFrame(rows)
    acc = pd.concat([o.table for o in outputs]).query("metric == 'acc'")
    curve["cloze_acc"] = acc["value"].to_numpy()
    curve["cloze_acc_stderr"] = acc["stderr"].to_numpy()
    kept = retention(outputs)
    ret = kept[kept.metric == "acc"] if not kept.empty else kept
    curve["cloze_retention"] = [1.0, *ret["retention"]]
    curve["cloze_retention_low"] = [1.0, *ret["retention_low"]]
    curve["cloze_retention_high"] = [1.0, *ret["retention_high"]]
    curve.sort_values("num_removed").to_csv(out / "curve.csv", index=False, float_format="%.6g")
    write_eval(out, outputs)


def load_outputs(folder: Path) -> list[EvalOutput]:
    """The per-model ``EvalOutput`` of a run, rebuilt from its ``eval.csv`` and ``eval_samples.csv``."""
    table, samples = pd.read_csv(folder / "eval.csv"), pd.read_csv(folder / "eval_samples.csv")
    return [EvalOutput(table[table.model == label].reset_index(drop=True),
                       {task: frame.drop(columns=["model", "task"]).reset_index(drop=True)
                        for task, frame in samples[samples.model == label].groupby("task")})
            for label in table["model"].unique()]


def merge(folders: list[Path]) -> None:
    """Fold the K rows measured in other processes (``--ks K --out DIR``) into OUT's tables,
    retention recomputed against OUT's K = 0 on the same documents."""
    curves = [pd.read_csv(OUT / "curve.csv", dtype={"removed": str})]
    outputs = load_outputs(OUT)
    for folder in folders:
        curves.append(pd.read_csv(folder / "curve.csv", dtype={"removed": str}))
        outputs += load_outputs(folder)
    rows = pd.concat(curves).drop_duplicates("num_removed", keep="last")
    order = [f"K={k}" for k in rows["num_removed"]]
    outputs = sorted({o.table["model"].iloc[0]: o for o in outputs}.values(),
                     key=lambda o: order.index(o.table["model"].iloc[0]))
    base = [c for c in rows.columns if not c.startswith("cloze_")]
    write_curve(rows[base].to_dict("records"), outputs)


def run_bench(args, models) -> None:
    config = BenchConfig(batch_sizes=tuple(parse_list(args.bench_batch_sizes, "--bench-batch-sizes", int, "1,4")),
                         prompt_lens=tuple(parse_list(args.bench_prompt_lens, "--bench-prompt-lens", int, "128,512")),
                         new_tokens=args.bench_new_tokens, repeats=args.bench_repeats)
    table = bench(models, config)
    table.to_csv(OUT / "bench.csv", index=False, float_format="%.6g")
    speedups(table).to_csv(OUT / "bench_speedup.csv", index=False, float_format="%.6g")
    print(speedups(table).to_string(index=False), flush=True)


def figure(curve: pd.DataFrame) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    k = curve["num_removed"]
    a.plot(k, curve["greedy_calibration_loss"].map(math.exp), "o-", label="calibration (chose the blocks)")
    a.plot(k, curve["heldout_perplexity"], "s--", label="held-out (95% bootstrap band)")
    a.fill_between(k, curve["heldout_perplexity_low"], curve["heldout_perplexity_high"], alpha=0.15, color="C1")
    a.set(xlabel="blocks removed (greedy)", ylabel="perplexity", title="SmolLM2-135M perplexity")
    a.legend(fontsize=8)
    b.errorbar(k, curve["cloze_retention"], yerr=[curve["cloze_retention"] - curve["cloze_retention_low"],
                                                  curve["cloze_retention_high"] - curve["cloze_retention"]],
               fmt="o-", capsize=3, label="cloze accuracy retained")
    b.axhline(0.25 / curve["cloze_acc"].iloc[0], color="gray", ls=":", label="chance / full model")
    b.set(xlabel="blocks removed (greedy)", ylabel="accuracy / full model's", title="built-in cloze (lm-eval)")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT / "pruned_eval.png", dpi=96)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--num-sequences", type=int, default=4, help="calibration windows")
    ap.add_argument("--heldout-sequences", type=int, default=8, help="held-out windows")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--limit", type=int, default=200, help="cloze items")
    ap.add_argument("--order-from", default=None,
                    help="prune_curve.csv whose greedy rows give the removal order (same calibration windows)")
    ap.add_argument("--bench-new-tokens", type=int, default=32)
    ap.add_argument("--bench-prompt-lens", default="128,512")
    ap.add_argument("--bench-batch-sizes", default="1,4")
    ap.add_argument("--bench-repeats", type=int, default=3)
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--figure-only", action="store_true", help="redraw the figure from curve.csv")
    ap.add_argument("--fast", action="store_true", help="skip the calibration re-measure (use the greedy losses)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 on a crowded machine)")
    ap.add_argument("--ks", default=",".join(map(str, KS)), help="blocks removed, in the order measured (0 first)")
    ap.add_argument("--out", type=Path, default=OUT, help="output folder (the figure is always drawn from OUT)")
    ap.add_argument("--merge", type=Path, nargs="*", default=None, help="fold these --out folders into OUT")
    args = ap.parse_args()
    args.ks = [int(k) for k in args.ks.split(",")]
    if args.merge:
        merge(args.merge)
        args.figure_only = True
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.figure_only:
        info = measure(args)
        (args.out / "summary.json").write_text(json.dumps({**vars(args), "out": str(args.out), **info}, indent=2))
    figure(pd.read_csv(OUT / "curve.csv"))
    print(pd.read_csv(OUT / "curve.csv").to_string(index=False))


if __name__ == "__main__":
    main()
