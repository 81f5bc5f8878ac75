"""`depthprobe analyze`: per-layer diagnostics of one model."""

from __future__ import annotations

import os
from pathlib import Path

import click
import torch

from depthprobe import distributed
from depthprobe.analysis import ALL_METRICS, DEFAULT_METRICS, analyze, parse_metrics
from depthprobe.cli.options import (
    analysis_kwargs,
    common_options,
    data_options,
    load_from_options,
    model_options,
    setup_logging,
)
from depthprobe.cli.parsing import parse_list
from depthprobe.cli.vision_options import run_image_analysis, vision_options
from depthprobe.errors import DepthprobeError
from depthprobe.probes.sweep import (
    DEFAULT_ATTRIBUTION_STEPS,
    DEFAULT_BLOCK_SIZES,
    EXECUTION_ORDERS,
    AttributionOptions,
)
from depthprobe.runs import DROP_PROGRESS, REPORT_HTML
from depthprobe.safeio import locks_out


@click.command("analyze")
@model_options
@data_options
@vision_options
@click.option(
    "--metrics",
    default=",".join(DEFAULT_METRICS),
    show_default=True,
    help=f"Comma list of {','.join(ALL_METRICS)}.",
)
@click.option(
    "--block-sizes",
    default=",".join(map(str, DEFAULT_BLOCK_SIZES)),
    show_default=True,
    help="With drop: sizes n of contiguous blocks l..l+n-1 to drop ('' to skip).",
)
@click.option(
    "--attribution-steps",
    type=int,
    default=None,
    help=f"Path points - 1 for --metrics attribution (default {DEFAULT_ATTRIBUTION_STEPS}); cost is steps+1 "
    "forward+backward passes.",
)
@click.option(
    "--execution",
    type=click.Choice(EXECUTION_ORDERS),
    default="auto",
    show_default=True,
    help="batch: the model's forward batch after batch; layer: every window through block l before block l+1 "
    "(each block's weights read once per sweep); auto: layer when weights are offloaded.",
)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Folder for the results.")
@click.option("--resume", is_flag=True, help="Continue an interrupted drop sweep in --out instead of restarting.")
@click.option("--no-report", is_flag=True, help="Do not write report.html.")
@common_options
@locks_out()  # one command at a time per --out; a killed one leaves no stuck lock
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
      depthprobe analyze ./big --max-memory cpu:4GiB --offload-folder /tmp/off --metrics angular,drop
      torchrun --nproc_per_node 4 -m depthprobe analyze smollm2 --out runs/smol  # windows split, rank 0 writes
      depthprobe analyze ./my-resnet --images digits --image-size 32 --metrics angular,grad,drop,probe --out runs/r
      depthprobe analyze ./facenet/model.pt --images faces/img_align_celeba --attributes faces/list_attr_celeba.txt
    """
    started = distributed.init_from_env(opts["device"])
    try:
        _analyze(opts)
    finally:
        if started:
            torch.distributed.destroy_process_group()


def _analyze(opts: dict) -> None:
    setup_logging(opts["verbose"])
    if run_image_analysis(opts):  # an image model: measured on --images (cli/vision_options.py)
        return
    main_rank = distributed.is_main()
    opts["quiet"] = opts["quiet"] or not main_rank  # under torchrun rank 0 prints, shows the bar and writes
    if distributed.rank_and_world()[1] > 1 and torch.cuda.is_available() and opts["device"] in ("auto", "cuda") \
            and not (opts["device_map"] or opts["max_memory"] or opts["offload_folder"]):
        opts["device"] = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # one GPU per process
    metrics = parse_metrics(opts["metrics"])
    # options are checked before the model loads
    options = {"block_sizes": parse_list(opts["block_sizes"], "--block-sizes", int, "2,4,8"),
               "execution": opts["execution"]}
    if opts["attribution_steps"] is not None:
        options["attribution_steps"] = AttributionOptions(steps=opts["attribution_steps"]).steps
    if opts["resume"] and not opts["out_dir"]:
        raise DepthprobeError("--resume needs --out (the folder of the interrupted run)")
    model, tokenizer = load_from_options(opts)
    result = analyze(model, tokenizer, metrics=metrics, options=options, progress_dir=opts["out_dir"],
                     resume=opts["resume"], **analysis_kwargs(opts))
    if not opts["quiet"]:
        click.echo(format_table(result))
        if result.summary.get("proxy_verdict"):
            click.echo(result.summary["proxy_verdict"])
    measured = [c for c in result.layers.columns if c != "layer"]
    if main_rank:
        _save(result, opts, measured)
    if result.summary["interrupted"]:
        raise DepthprobeError(interrupted_message(result.summary["interrupted"], opts["out_dir"], measured))
    if result.summary["nonfinite"]:
        where = f"; results saved in {opts['out_dir']}" if opts["out_dir"] else ""
        # the non-finite note, not a later caveat (depthprobe.caveats adds notes after it)
        note = next(n for n in result.summary["notes"] if n.startswith("non-finite"))
        raise DepthprobeError(note + where)


def _save(result, opts: dict, measured: list[str]) -> None:
    from depthprobe.report import write_report

    if not opts["out_dir"]:
        # said even with -q (benchmarks time `analyze -q` without --out): a silent run saves nothing
        click.echo("Nothing saved: add --out DIR to keep the table and the report.", err=True)
    elif measured:  # an interrupt before any metric finished leaves nothing worth a table or report
        out = result.save(opts["out_dir"])
        if not opts["no_report"]:
            write_report([result], out / REPORT_HTML)
        click.echo(f"Results written to {out}/", err=True)


def interrupted_message(sweep: str, out_dir: str | None, measured: list[str]) -> str:
    """What an interrupt kept: saved metrics, and --resume only when a drop batch finished."""
    if not measured:
        return f"interrupted during the {sweep} sweep before any metric finished; nothing was saved"
    where = f"saved in {out_dir}" if out_dir else "not saved (no --out)"
    progress = Path(out_dir) / DROP_PROGRESS if out_dir else None
    resumable = progress is not None and progress.is_file() and len(progress.read_text().splitlines()) > 1
    resume = f" (rerun with --resume to continue the {sweep} sweep)" if resumable else ""
    return f"interrupted during the {sweep} sweep; the metrics finished before it are {where}{resume}"


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
