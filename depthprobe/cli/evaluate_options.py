"""Options and printing shared by `prune`, `eval` and `bench` for judging a pruned model."""

from __future__ import annotations

import logging

import click

from depthprobe.cli.options import _stack
from depthprobe.evaluate.bench import BenchConfig, parse_ints

heldout_options = _stack(
    click.option("--eval-text-file", type=click.Path(dir_okay=False), default=None,
                 help="Held-out text for scoring (default: the end of the built-in text, never calibration)."),
    click.option("--eval-dataset", default=None, help="Held-out datasets name NAME[:CONFIG[:SPLIT]]."),
    click.option("--heldout/--no-heldout", default=True, show_default=True,
                 help="Score on held-out windows beside the calibration ones."),
)


def print_heldout(summary: dict) -> None:
    """One line: held-out loss and perplexity before -> after, with 95% intervals."""
    if "heldout_loss_before" not in summary:
        return
    lo_b, hi_b = summary["heldout_loss_before_interval"]
    lo_a, hi_a = summary["heldout_loss_after_interval"]
    click.echo(
        f"held-out loss {summary['heldout_loss_before']:.4f} [{lo_b:.4f}, {hi_b:.4f}] -> "
        f"{summary['heldout_loss_after']:.4f} [{lo_a:.4f}, {hi_a:.4f}]   perplexity "
        f"{summary['heldout_perplexity_before']:.2f} -> {summary['heldout_perplexity_after']:.2f}   "
        f"({summary['heldout_tokens']} tokens, {summary['heldout_source']})"
    )


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
    return BenchConfig(batch_sizes=parse_ints(opts["batch_sizes"], "--batch-sizes"),
                       prompt_lens=parse_ints(opts["prompt_lens"], "--prompt-lens"),
                       new_tokens=opts["new_tokens"], repeats=opts["repeats"])
