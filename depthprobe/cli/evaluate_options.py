"""Options and printing shared by `prune`, `eval` and `bench` for judging a pruned model."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import click
import pandas as pd

from depthprobe.cli.options import _stack
from depthprobe.cli.parsing import parse_list
from depthprobe.evaluate.bench import BenchConfig, bench, fit_config, speedups
from depthprobe.evaluate.harness import (
    EvalOutput,
    check_limit,
    evaluate_model,
    load_tasks,
    resolve_tasks,
    retention,
    task_manager,
    write_eval,
)

heldout_options = _stack(
    click.option("--eval-text-file", type=click.Path(dir_okay=False), default=None,
                 help="Held-out text for scoring (default: the end of the built-in text, never calibration)."),
    click.option("--eval-dataset", default=None, help="Held-out datasets name NAME[:CONFIG[:SPLIT]]."),
    click.option("--heldout/--no-heldout", default=True, show_default=True,
                 help="Score on held-out windows beside the calibration ones."),
    click.option("--heldout-windows", type=int, default=16, show_default=True,
                 help="Held-out windows of --seq-len tokens (the prune curve, repair and healing all use them)."),
)


def heldout_line(summary: dict) -> str | None:
    """One line for every held-out loss of a prune: full -> blocks removed (95% intervals),
    then repaired and healed with the share of the gap they recover; perplexity of the full
    and of the exported model. None when nothing was scored on held-out text."""
    if "heldout_loss_before" in summary:
        lo_b, hi_b = summary["heldout_loss_before_interval"]
        lo_a, hi_a = summary["heldout_loss_after_interval"]
        full, removed = summary["heldout_loss_before"], summary["heldout_loss_after"]
        parts = [f"held-out loss {full:.4f} [{lo_b:.4f}, {hi_b:.4f}] -> blocks removed {removed:.4f} "
                 f"[{lo_a:.4f}, {hi_a:.4f}]"]
        where = f"{summary['heldout_tokens']} tokens, {summary['heldout_source']}"
    elif "heldout_loss_full" in summary:  # --no-heldout with --repair / --heal
        full, removed = summary["heldout_loss_full"], summary["heldout_loss_removed"]
        parts = [f"held-out loss {full:.4f} -> blocks removed {removed:.4f}"]
        where = summary["heldout_source"]
    else:
        return None
    for name, recovered in (("repaired", "repair_recovered"), ("healed", "heal_recovered")):
        value = summary.get(f"heldout_loss_{name}", math.nan)
        if value == value:  # not NaN
            parts.append(f"{name} {value:.6f} ({100 * summary[recovered]:.0f}% of the gap recovered)")
    final = summary.get("heldout_loss_final", removed)
    return (", ".join(parts) + f"   perplexity {math.exp(full):.2f} -> {math.exp(final):.2f}   ({where})")


def print_heldout(summary: dict) -> None:
    line = heldout_line(summary)
    if line is not None:
        click.echo(line)


def quiet_harness(verbose: bool) -> None:
    """lm-eval logs every step at INFO and warns about models passed as objects: errors only."""
    logging.getLogger("lm_eval").setLevel(logging.INFO if verbose else logging.ERROR)


bench_options = _stack(
    click.option("--batch-sizes", default="1,4", show_default=True, help="Comma list of batch sizes."),
    click.option("--prompt-lens", default="128,512", show_default=True, help="Comma list of prompt lengths."),
    click.option("--new-tokens", type=int, default=32, show_default=True, help="Greedy decode steps per prompt."),
    click.option("--repeats", type=int, default=3, show_default=True, help="Timed runs per setting (median)."),
)


def bench_config(opts: dict) -> BenchConfig:
    """``BenchConfig`` from the parsed ``bench_options``."""
    return BenchConfig(batch_sizes=tuple(parse_list(opts["batch_sizes"], "--batch-sizes", int, "1,4")),
                       prompt_lens=tuple(parse_list(opts["prompt_lens"], "--prompt-lens", int, "128,512")),
                       new_tokens=opts["new_tokens"], repeats=opts["repeats"])


judge_options = _stack(
    click.option("--eval-tasks", default=None,
                 help="lm-eval tasks to score before and after pruning, e.g. depthprobe_cloze or path/to/task.yaml."),
    click.option("--eval-limit", type=int, default=None, help="Documents per task for --eval-tasks (default all)."),
    click.option("--eval-num-fewshot", type=int, default=None, help="Few-shot examples for --eval-tasks."),
    click.option("--bench", "run_bench", is_flag=True,
                 help="Measure prefill/decode tokens/s and peak memory before and after pruning."),
)


class PruneJudge:
    """``prune --eval-tasks / --bench``: score the model before pruning and after, write
    ``eval*.csv`` / ``bench*.csv`` into the prune folder (read by its report).

    Task names and the limit are checked before any work. Before and after are measured
    one after the other in the same process (the model is pruned in place).
    """

    def __init__(self, opts: dict, model, tokenizer):
        self.opts, self.model, self.tokenizer = opts, model, tokenizer
        self.spec = self.manager = None
        if opts["eval_tasks"]:
            check_limit(opts["eval_limit"])
            self.spec = resolve_tasks(opts["eval_tasks"])
            self.manager = task_manager(self.spec)
            load_tasks(self.manager, self.spec)
        self.outputs: list[EvalOutput] = []
        self.bench_rows: list[pd.DataFrame] = []

    def measure(self, label: str) -> None:
        if self.spec is not None:
            self.outputs.append(evaluate_model(self.model, self.tokenizer, self.spec, label=label,
                                               limit=self.opts["eval_limit"], num_fewshot=self.opts["eval_num_fewshot"],
                                               batch_size=self.opts["batch_size"], manager=self.manager))
        if self.opts["run_bench"]:
            config = fit_config(BenchConfig(), self.model)
            self.bench_rows.append(bench({label: self.model}, config, progress=not self.opts["quiet"]))

    def write(self, out_dir: str) -> None:
        if self.outputs:
            write_eval(out_dir, self.outputs)
            click.echo(retention(self.outputs).drop(columns=["reference"])
                       .to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        if self.bench_rows:
            table = pd.concat(self.bench_rows, ignore_index=True)
            table.to_csv(Path(out_dir) / "bench.csv", index=False, float_format="%.6g")
            speed = speedups(table)
            speed.to_csv(Path(out_dir) / "bench_speedup.csv", index=False, float_format="%.6g")
            click.echo(speed.drop(columns=["reference"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
