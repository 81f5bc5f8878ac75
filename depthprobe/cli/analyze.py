"""`depthprobe analyze`: per-layer diagnostics of one model."""

from __future__ import annotations

from pathlib import Path

import click

from depthprobe.cli.options import (
    common_options,
    data_options,
    load_from_options,
    model_options,
    setup_logging,
)


@click.command("analyze")
@model_options
@data_options
@click.option(
    "--metrics",
    default="angular,variance,grad,lens",
    show_default=True,
    help="Comma list of angular,variance,grad,lens,drop,attribution.",
)
@click.option(
    "--attribution-steps",
    type=int,
    default=None,
    help="Path points - 1 for --metrics attribution (default 8); cost is steps+1 forward+backward passes.",
)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Folder for the results.")
@click.option("--no-report", is_flag=True, help="Do not write report.html.")
@common_options
def command(**opts) -> None:
    """Record per-layer diagnostics of MODEL on calibration text.

    MODEL is a hub id, a local folder, a .gguf file, or a packaged offline model
    (smollm2, minilm).

    \b
    Examples:
      depthprobe analyze smollm2 --out runs/smol
      depthprobe analyze smollm2 --metrics angular,variance,grad --num-sequences 4 --seq-len 256
      depthprobe analyze ./my-model --text-file corpus.txt --metrics drop --out runs/mine
      depthprobe analyze meta-llama/Llama-2-7b --device cuda --dtype bfloat16 --batch-size 2
      depthprobe analyze smollm2 --metrics angular,grad,lens,attribution,drop --attribution-steps 4 --out runs/p
    """
    from depthprobe.analyze import analyze, parse_metrics

    setup_logging(opts["verbose"])
    metrics = parse_metrics(opts["metrics"])
    if opts["attribution_steps"] is not None:  # check before the model loads
        from depthprobe.probes.attribution import AttributionConfig

        AttributionConfig(steps=opts["attribution_steps"])
    model, tokenizer = load_from_options(opts)
    result = analyze(
        model,
        tokenizer,
        metrics=metrics,
        num_sequences=opts["num_sequences"],
        seq_len=opts["seq_len"],
        batch_size=opts["batch_size"],
        text_file=opts["text_file"],
        dataset=opts["dataset"],
        layers_path=opts["layers_path"],
        model_name=opts["model"],
        progress=not opts["quiet"],
        options={"attribution_steps": opts["attribution_steps"]} if opts["attribution_steps"] is not None else None,
    )
    if not opts["quiet"]:
        click.echo(format_table(result))
        if result.summary.get("proxy_verdict"):
            click.echo(result.summary["proxy_verdict"])
    if opts["out_dir"]:
        out = result.save(opts["out_dir"])
        if not opts["no_report"]:
            _write_report(result, out)
        click.echo(f"Results written to {out}/", err=True)


def _write_report(result, out: Path) -> None:
    try:
        from depthprobe.report import write_report
    except ImportError:  # report package not built yet
        return
    write_report([result], out / "report.html")


def format_table(result) -> str:
    """The per-layer table as terminal text, with a one-line header."""
    import pandas as pd

    s = result.summary
    loss = s.get("base_loss")
    head = (
        f"{s['model']}  ({s['architecture']}, {s['num_layers']} blocks, {s['num_tokens']} tokens, "
        f"{s['dtype']} on {s['device']})"
    )
    if loss is not None:
        head += f"\nbase loss {loss:.4f}  perplexity {s['base_perplexity']:.2f}"
    for note in s.get("notes", []):
        head += f"\nnote: {note}"
    with pd.option_context("display.max_rows", 500, "display.width", 200, "display.max_columns", 30):
        table = result.layers.to_string(index=False, float_format=lambda v: f"{v:.4g}")
    return f"{head}\n{table}"
