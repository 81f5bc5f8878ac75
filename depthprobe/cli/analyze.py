"""`depthprobe analyze`: per-layer diagnostics of one model."""

from __future__ import annotations

import os
from pathlib import Path

import click

from depthprobe.cli import preflight
from depthprobe.cli.choices import (
    ALL_METRICS,
    DEFAULT_ATTRIBUTION_STEPS,
    DEFAULT_BLOCK_SIZES,
    DEFAULT_METRICS,
    EXECUTION_ORDERS,
)
from depthprobe.cli.interrupts import interrupt_message, keeps
from depthprobe.cli.options import (
    analysis_kwargs,
    common_options,
    data_options,
    load_from_options,
    model_options,
    open_from_options,
    owned_outputs,
    refuse_existing_out,
    save_run,
    setup_logging,
)
from depthprobe.cli.parsing import parse_list
from depthprobe.cli.vision_options import run_image_analysis, vision_options
from depthprobe.config import data_free
from depthprobe.errors import DepthprobeError
from depthprobe.runs import DROP_PROGRESS
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
@click.option("--labels", "labels_file", type=click.Path(dir_okay=False), default=None,
              help="With --metrics probe on a text model: a CSV of window[,position] and label columns.")
@click.option("--lens", "lens_dir", type=click.Path(file_okay=False), default=None,
              help="With --metrics tuned-lens: a lens folder (depthprobe lens train, or tuned-lens's); "
              "none: one is trained first on the built-in text with a small budget.")
@click.option("--lens-positions", default=None,
              help="Write lens_tokens.csv: the logit lens's top-k tokens per block at these window positions, "
              "e.g. 0,5,-1 (negative: from the end).")
@click.option("--lens-topk", type=int, default=None, help="Tokens per position in lens_tokens.csv [default: 5].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Folder for the results.")
@click.option("--resume", is_flag=True, help="Continue an interrupted drop sweep in --out instead of restarting.")
@click.option("--force", is_flag=True, help="Write into a non-empty --out: the files of the run there are removed first.")
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
      depthprobe analyze smollm2 --metrics spectra --out runs/w  # data-free: weight spectra, no text, no forward
      depthprobe analyze smollm2 --metrics probe --labels labels.csv --num-sequences 32  # window,label columns
      depthprobe analyze ./my-resnet --images digits --image-size 32 --metrics angular,grad,drop,probe --out runs/r
      depthprobe analyze ./facenet/model.pt --images faces/img_align_celeba --attributes faces/list_attr_celeba.txt
      depthprobe analyze smollm2 --metrics lens,tuned-lens --lens lenses/smol --lens-positions 0,5,-1 --out runs/l
    """
    if opts["out_dir"]:  # image runs too: a folder holds one run
        refuse_existing_out(opts["out_dir"], opts["force"] or opts["resume"],
                            "--force to replace the run there, or --resume to continue it")
    if run_image_analysis(opts):  # an image model, measured on --images (cli/vision_options.py)
        return
    options = _checked(opts)  # before the text model's config is read
    from depthprobe import distributed

    started = distributed.init_from_env(opts["device"])
    try:
        _analyze(opts, options)
    finally:
        if started:
            import torch

            torch.distributed.destroy_process_group()


def _checked(opts: dict) -> dict:
    """Every check that needs no forward pass (:mod:`depthprobe.cli.preflight`); the sweep options."""
    preflight.check_options(opts)
    metrics = preflight.check_metrics(opts["metrics"])
    options = {"block_sizes": parse_list(opts["block_sizes"], "--block-sizes", int, "2,4,8"),
               "execution": opts["execution"]}
    if opts["attribution_steps"] is not None:
        preflight.at_least(opts, {"attribution_steps": 1})
        options["attribution_steps"] = opts["attribution_steps"]
    if opts["labels_file"] or "probe" in metrics:
        options["labels_file"] = preflight.check_labels(opts, metrics)
    options.update(_lens_options(opts, metrics))
    return options


def _lens_options(opts: dict, metrics) -> dict:
    """``--lens``, ``--lens-positions``, ``--lens-topk`` checked before any weight is read."""
    from depthprobe.errors import DepthprobeError

    options = {}
    if opts["lens_dir"] is not None:
        if "tuned-lens" not in metrics:
            raise DepthprobeError("--lens is read by --metrics tuned-lens; add tuned-lens to --metrics")
        from pathlib import Path

        if not all((Path(opts["lens_dir"]) / name).is_file() for name in ("config.json", "params.pt")):
            raise DepthprobeError(f"--lens {opts['lens_dir']}: no config.json and params.pt there; train one with "
                                  "`depthprobe lens train MODEL --out DIR` or give a tuned-lens folder")
        options["lens"] = opts["lens_dir"]
    if opts["lens_positions"] is not None:
        options["lens_positions"] = tuple(parse_list(opts["lens_positions"], "--lens-positions", int, "0,5,-1"))
        if not options["lens_positions"]:
            raise DepthprobeError("--lens-positions is empty; e.g. --lens-positions 0,5,-1")
        bad = [p for p in options["lens_positions"] if not -opts["seq_len"] <= p < opts["seq_len"]]
        if bad:
            raise DepthprobeError(f"--lens-positions {bad[0]} is outside a window of --seq-len {opts['seq_len']} "
                                  f"tokens; use -{opts['seq_len']}..{opts['seq_len'] - 1}")
    if opts["lens_topk"] is not None:
        preflight.at_least(opts, {"lens_topk": 1})
        options["lens_topk"] = opts["lens_topk"]
    return options


def _analyze(opts: dict, options: dict) -> None:
    from depthprobe import distributed

    setup_logging(opts["verbose"])
    main_rank = distributed.is_main()
    opts["quiet"] = opts["quiet"] or not main_rank  # under torchrun rank 0 prints, shows the bar and writes
    if distributed.rank_and_world()[1] > 1 and _cuda() and opts["device"] in ("auto", "cuda") \
            and not (opts["device_map"] or opts["max_memory"] or opts["offload_folder"]):
        opts["device"] = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # one GPU per process
    config, tokenizer = open_from_options(opts)
    windows = None
    if not data_free(preflight.check_metrics(opts["metrics"])):  # data-free metrics (spectra) read no text
        preflight.check_config(opts, config)
        windows = preflight.calibration_windows(opts, tokenizer, config)
    # --force: the old run's files, removed once the new run is saved (a failure keeps the old run)
    opts["stale"] = owned_outputs(opts["out_dir"]) if opts["force"] and opts["out_dir"] and main_rank else set()
    model, tokenizer = load_from_options(opts, tokenizer)
    from depthprobe.analysis import analyze

    keeps("finished drop batches" if "drop" in opts["metrics"] else None, opts["out_dir"])
    result = analyze(model, tokenizer, metrics=opts["metrics"], options=options, progress_dir=opts["out_dir"],
                     resume=opts["resume"], windows=windows, **analysis_kwargs(opts))
    measured = [c for c in result.layers.columns if c != "layer"]
    if not opts["quiet"] and measured:
        click.echo(format_table(result))
        if result.summary.get("proxy_verdict"):
            click.echo(result.summary["proxy_verdict"])
    if main_rank and (measured or not opts["out_dir"]):  # a run cut before any metric leaves nothing to save
        save_run(result, opts)
    if result.summary.get("unsupported"):  # the first refused sweep names the reason
        name, reason = next(iter(result.summary["unsupported"].items()))
        saved = f"; the other metrics are saved in {opts['out_dir']}" if opts["out_dir"] and measured else ""
        raise DepthprobeError(f"--metrics {name} is {reason}; leave {name} out of --metrics{saved}")
    if result.summary["interrupted"]:
        raise DepthprobeError(interrupted_message(result.summary["interrupted"], opts, measured))
    if result.summary["nonfinite"]:
        where = f"; results saved in {opts['out_dir']}" if opts["out_dir"] else ""
        # the non-finite note, not a later caveat (depthprobe.caveats adds notes after it)
        note = next(n for n in result.summary["notes"] if n.startswith("non-finite"))
        raise DepthprobeError(note + where)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def interrupted_message(sweep: str, opts: dict, measured: list[str]) -> str:
    """One true line: what finished, where it is kept, and the command that continues."""
    out_dir = opts["out_dir"]
    progress = Path(out_dir) / DROP_PROGRESS if out_dir else None
    batches = max(len(progress.read_text().splitlines()) - 1, 0) if progress is not None and progress.is_file() else 0
    finished = f"the main pass ({', '.join(measured)})" if measured else "no metric"
    kept = f"{batches} finished {sweep} batch(es) in {DROP_PROGRESS}" if batches else None
    if not measured and not kept:
        return f"interrupted during the {sweep} sweep before any metric finished; nothing was saved"
    return interrupt_message(f"the {sweep} sweep", finished, out_dir, kept)


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
