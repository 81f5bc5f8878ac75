"""`depthprobe prune`: choose blocks, remove them, save a smaller model that loads anywhere."""

from __future__ import annotations

import click

from depthprobe.cli.options import (
    analysis_kwargs,
    common_options,
    data_options,
    load_from_options,
    model_options,
    refuse_existing_out,
    setup_logging,
)
from depthprobe.errors import DepthprobeError


def _layer_list(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise DepthprobeError(f"--remove takes comma-separated layer indices like 21,22,23 (got {value!r})") from exc


@click.command("prune")
@model_options
@data_options
@click.option("--remove", default=None, help="Comma list of 0-based blocks to remove, e.g. 21,22,23.")
@click.option("--num-layers", "num_layers", type=int, default=None, help="Remove K blocks chosen by --strategy.")
@click.option(
    "--strategy",
    type=click.Choice(["drop", "greedy", "angular", "block-influence", "block"]),
    default="greedy",
    show_default=True,
    help="How to choose the K blocks.",
)
@click.option("--curve/--no-curve", default=True, show_default=True, help="Measure prune_curve.csv for every strategy.")
@click.option("--curve-max", type=int, default=None, help="Largest number of removed blocks on the curve (default K).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Folder for the pruned model.")
@click.option("--no-report", is_flag=True, help="Do not write report.html.")
@click.option("--force", is_flag=True, help="Write into an existing, non-empty --out.")
@common_options
def command(**opts) -> None:
    """Remove blocks of MODEL and save the smaller model to --out.

    The folder loads with plain transformers (AutoModelForCausalLM.from_pretrained) and holds
    prune.json (what was removed, loss before/after), prune_curve.csv (loss against the
    number of removed blocks for each strategy), prune_excess.csv (each strategy's loss
    minus greedy's at the same K) and analysis/ (the per-layer table).

    \b
    Examples:
      depthprobe prune smollm2 --num-layers 6 --strategy greedy --out runs/smol-24
      depthprobe prune smollm2 --remove 21,22,23 --out runs/smol-27 --no-curve
      depthprobe prune ./my-model --num-layers 8 --strategy block --text-file corpus.txt --out pruned/
    """
    from depthprobe.prune import prune
    from depthprobe.report import write_report

    setup_logging(opts["verbose"])
    remove = _layer_list(opts["remove"])
    if (remove is None) == (opts["num_layers"] is None):
        raise DepthprobeError("give either --remove LAYERS or --num-layers K")
    refuse_existing_out(opts["out_dir"], opts["force"])
    model, tokenizer = load_from_options(opts)
    result = prune(
        model,
        tokenizer,
        remove=remove,
        num_layers=opts["num_layers"],
        strategy=opts["strategy"] if remove is None else "manual",
        curve=opts["curve"],
        curve_max=opts["curve_max"],
        out_dir=opts["out_dir"],
        **analysis_kwargs(opts),
    )
    s = result.summary()
    click.echo(f"removed blocks {s['removed']} ({s['num_layers_before']} -> {s['num_layers_after']})")
    if s["objective"] == "lm_loss":
        click.echo(
            f"loss {s['loss_before']:.4f} -> {s['loss_after']:.4f}   "
            f"perplexity {s['perplexity_before']:.2f} -> {s['perplexity_after']:.2f}"
        )
    else:
        click.echo(f"final-state cosine drift {s['loss_before']:.4g} -> {s['loss_after']:.4g}")
    if result.curve is not None and not opts["quiet"]:
        click.echo(result.curve.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        at_k = result.excess[result.excess["K"] == result.excess["K"].max()]
        click.echo("loss above greedy's at K = " + ", ".join(
            f"{row.strategy} {row.excess:+.4f}" for row in at_k.itertuples(index=False)))
    if not opts["no_report"]:
        write_report([opts["out_dir"]], f"{opts['out_dir']}/report.html")
    click.echo(f"Pruned model written to {opts['out_dir']}/", err=True)
