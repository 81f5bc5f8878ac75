"""`depthprobe compare`: train several norm placements on equal terms, side by side."""

from __future__ import annotations

from pathlib import Path

import click

from depthprobe.cli.options import common_options, setup_logging
from depthprobe.cli.parsing import parse_list
from depthprobe.cli.train import configs_from_options, train_options
from depthprobe.runs import REPORT_HTML
from depthprobe.safeio import locks_out
from depthprobe.train.model import PLACEMENT_NAMES


@click.command("compare")
@click.option(
    "--variants", default="pre,post,mix,peri,lns", show_default=True, help=f"Comma list of {','.join(PLACEMENT_NAMES)}."
)
@click.option("--seeds", "num_seeds", type=int, default=3, show_default=True, help="Seeds per variant.")
@click.option("--seed", type=int, default=0, show_default=True, help="First seed (seed index i uses seed+i).")
@train_options
@click.option(
    "--metrics",
    default="angular,variance,grad,lens,drop",
    show_default=True,
    help="What to analyze on every final model.",
)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Comparison folder.")
@click.option("--no-report", is_flag=True, help="Do not write OUT/report.html.")
@common_options
@locks_out()  # one command at a time per --out; a killed one leaves no stuck lock
def command(**opts) -> None:
    """Train each variant for each seed, analyze every final model, compare.

    Every variant sees the same initial weights and the same data order for a given seed.
    Writes OUT/comparison.csv, OUT/comparison_summary.csv (mean ± sd per variant and a
    paired test against pre), OUT/comparison_layers.csv, OUT/summary.json and one run
    folder per variant and seed.

    \b
    Examples:
      depthprobe compare --variants pre,post,mix,peri,lns --seeds 3 --preset tiny --steps 200 --out runs/cmp
      depthprobe compare --variants pre,lns --seeds 5 --preset cpu-small --steps 300 --out runs/lns
    """
    from depthprobe.analysis import parse_metrics
    from depthprobe.report import write_report
    from depthprobe.train.compare import compare

    setup_logging(opts["verbose"])
    variants = parse_list(opts["variants"], "--variants", str, "pre,lns")
    model_cfg, train_cfg, data_cfg = configs_from_options(opts, "pre", opts["seed"])
    result = compare(
        variants,
        opts["num_seeds"],
        model_cfg,
        train_cfg,
        data_cfg,
        opts["out_dir"],
        metrics=parse_metrics(opts["metrics"]),
        progress=not opts["quiet"],  # the library writes tables only; HTML is written here, at the edge
    )
    if not opts["no_report"] and result.analyses:  # the folder expands to one run per variant
        write_report([opts["out_dir"]], Path(opts["out_dir"]) / REPORT_HTML, title="depthprobe compare")
    if not opts["quiet"]:
        import pandas as pd

        with pd.option_context("display.width", 200, "display.max_columns", 20):
            click.echo(result.summary.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        for note in result.notes:
            click.echo(f"note: {note}")
    click.echo(f"Comparison written to {opts['out_dir']}/", err=True)
