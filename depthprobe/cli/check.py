"""`depthprobe check`: compare a run against a baseline; exit 1 when anything moved."""

from __future__ import annotations

import click

from depthprobe.cli.choices import DEFAULT_ATOL, DEFAULT_RTOL


@click.command("check")
@click.argument("run_dir", type=click.Path())
@click.option("--baseline", "baseline_dir", required=True, type=click.Path(), help="Baseline run folder.")
@click.option("--rtol", type=float, default=DEFAULT_RTOL, show_default=True, help="Relative tolerance.")
@click.option("--atol", type=float, default=DEFAULT_ATOL, show_default=True, help="Absolute tolerance.")
@click.option(
    "--metrics",
    default=None,
    help="Comma list of layers.csv columns and/or base_loss, base_perplexity (default: all in the baseline).",
)
@click.option("--all", "show_all", is_flag=True, help="Print every compared value, not only what moved.")
@click.option("--out", "out_csv", type=click.Path(dir_okay=False), default=None, help="Write the full comparison CSV.")
@click.option("--allow-different-text", is_flag=True,
              help="Compare even when the model, calibration text, windows or dtype differ (exit 2 otherwise).")
@click.pass_context
def command(ctx: click.Context, **opts) -> None:
    """Compare RUN_DIR with a baseline, metric by metric and layer by layer.

    Both are run folders (analyze, prune or train --out; or baselines written by the pytest
    plugin). A value moved when |value - baseline| > atol + rtol*|baseline|; NaN on both
    sides is equal. Exit 0 when nothing moved, 1 when something did, 2 on bad input, including
    runs of a different model, calibration text, window setup or dtype (--allow-different-text).

    \b
    Examples:
      depthprobe check runs/today --baseline runs/baseline
      depthprobe check runs/today --baseline runs/baseline --rtol 0.01 --metrics angular_distance,base_loss
      depthprobe check runs/today --baseline runs/baseline --all --out diff.csv
    """
    from depthprobe.safeio import atomic_to_csv
    from depthprobe.testing.compare import compare_runs, format_comparison, summarize

    rtol, atol, show_all, out_csv = opts["rtol"], opts["atol"], opts["show_all"], opts["out_csv"]
    table = compare_runs(opts["run_dir"], opts["baseline_dir"], rtol=rtol, atol=atol, metrics=opts["metrics"],
                         allow_different_text=opts["allow_different_text"])
    for difference in table.attrs.get("setup_differences", []):
        click.echo(f"note: measured differently: {difference}")
    moved = not table["ok"].all()
    if moved or show_all:
        click.echo(format_comparison(table, only_moved=not show_all, max_rows=len(table) if show_all else 50))
    click.echo(("FAIL: " if moved else "OK: ") + summarize(table, rtol, atol))
    if out_csv:
        atomic_to_csv(table, out_csv, index=False, float_format="%.10g")
    ctx.exit(1 if moved else 0)
