"""`depthprobe prune`: choose blocks, remove them, save a smaller model that loads anywhere."""

from __future__ import annotations

import json
from pathlib import Path

import click

from depthprobe.cli import preflight
from depthprobe.cli.choices import STRATEGIES
from depthprobe.cli.evaluate_options import (
    PruneJudge,
    heldout_options,
    judge_options,
    print_heldout,
    quiet_harness,
)
from depthprobe.cli.interrupts import keeps
from depthprobe.cli.options import (
    analysis_kwargs,
    checked_resume_options,
    common_options,
    data_options,
    load_from_options,
    model_options,
    open_from_options,
    refuse_existing_out,
    setup_logging,
)
from depthprobe.cli.parsing import parse_list
from depthprobe.runs import REPORT_HTML
from depthprobe.safeio import atomic_write_text, locks_out

#: the options of a prune, kept in its --out: a --resume with other options is refused
OPTIONS_JSON = "prune_options.json"
#: options that do not change what a prune computes
_NOT_RECORDED = ("quiet", "verbose", "resume", "force", "no_report", "dry_run", "out_dir")  # out_dir: the folder itself


@click.command("prune")
@model_options
@data_options
@click.option("--remove", default=None, help="Comma list of 0-based blocks to remove, e.g. 21,22,23.")
@click.option("--num-layers", "num_layers", type=int, default=None, help="Remove K blocks chosen by --strategy.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="greedy", show_default=True,
              help="How to choose the K blocks.")
@click.option("--curve/--no-curve", default=True, show_default=True, help="Measure prune_curve.csv for every strategy.")
@click.option("--curve-max", type=int, default=None, help="Largest number of removed blocks on the curve (default K).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Folder for the pruned model.")
@click.option("--resume", is_flag=True, help="Continue an interrupted prune in --out instead of restarting.")
@click.option("--no-report", is_flag=True, help="Do not write report.html.")
@click.option("--force", is_flag=True, help="Write into an existing, non-empty --out.")
@heldout_options
@judge_options
@click.option("--repair", type=click.Choice(["linear", "cosine"]), default=None,
              help="Fit a linear map for each removed span and fuse it into the block before it.")
@click.option("--repair-windows", type=int, default=64, show_default=True,
              help="Windows of --seq-len tokens the maps are fit on (the last 20 percent validate).")
@click.option("--repair-ridge", default="0.001,0.01,0.1", show_default=True,
              help="Ridges toward no change (0: lstsq), comma list: each is fit, the validation windows keep the best.")
@click.option("--repair-after", is_flag=True,
              help="Also fit a map into the first kept block after each span (a second writer at the seam).")
@click.option("--heal", type=click.Choice(["lora"]), default=None, help="Heal with LoRA, merged before export.")
@click.option("--heal-steps", type=int, default=100, show_default=True, help="LoRA training steps.")
@click.option("--heal-text-file", type=click.Path(dir_okay=False), default=None,
              help="Healing text (default: the built-in text without the held-out windows).")
@click.option("--heal-rank", type=int, default=8, show_default=True, help="LoRA rank.")
@click.option("--heal-modules", default="seams", show_default=True,
              help="seams (MLPs beside each seam), mlp (every MLP) or module names like down_proj,up_proj.")
@click.option("--heal-lr", type=float, default=5e-4, show_default=True, help="LoRA learning rate.")
@common_options
@locks_out()  # one command at a time per --out; a killed one leaves no stuck lock
def command(**opts) -> None:
    """Remove blocks of MODEL and save the smaller model to --out.

    The folder loads with plain transformers (AutoModelForCausalLM.from_pretrained) and holds
    prune.json (what was removed, loss before/after on the calibration windows and on
    held-out windows, with bootstrap intervals), prune_curve.csv (calibration and held-out
    loss against the number of removed blocks for each strategy), prune_excess.csv (each
    strategy's loss minus greedy's at the same K) and analysis/ (the per-layer table).
    Held-out text: --eval-text-file / --eval-dataset, default the end of the built-in text,
    which the calibration windows never touch. --eval-tasks adds eval.csv and
    eval_retention.csv (lm-eval-harness before and after), --bench adds bench.csv and
    bench_speedup.csv (tokens/s before and after).

    \b
    Examples:
      depthprobe prune smollm2 --num-layers 6 --strategy greedy --out runs/smol-24
      depthprobe prune smollm2 --remove 21,22,23 --out runs/smol-27 --no-curve
      depthprobe prune smollm2 --num-layers 6 --eval-tasks depthprobe_cloze --bench --out runs/smol-24
      depthprobe prune ./my-model --num-layers 8 --strategy block --text-file corpus.txt --out pruned/
      depthprobe prune smollm2 --num-layers 6 --strategy block --repair linear --out runs/smol-24-repaired
      depthprobe prune smollm2 --num-layers 6 --repair linear --heal lora --heal-steps 100 --out runs/smol-24-healed

    With --repair or --heal every loss is also measured on those held-out windows (repair_curve.csv,
    repair_spans.csv, heal_losses.csv); a rerun of an interrupted --heal resumes from the
    checkpoint in --out.
    """
    remove = preflight.check_prune_options(opts)
    preflight.check_options(opts)
    refuse_existing_out(opts["out_dir"], opts["force"] or opts["resume"], "--force to write into it, or --resume to continue")
    recorded = _check_resume_options(opts)
    setup_logging(opts["verbose"])
    quiet_harness(opts["verbose"])
    judge = PruneJudge(opts, fingerprint=json.dumps(recorded, sort_keys=True))
    judge.check()  # lm-eval tasks resolve before anything loads
    config, tokenizer = open_from_options(opts)
    preflight.check_config(opts, config)
    preflight.check_prune_config(opts, config, remove)
    windows = preflight.calibration_windows(opts, tokenizer, config)
    model, tokenizer = load_from_options(opts, tokenizer)
    Path(opts["out_dir"]).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(opts["out_dir"]) / OPTIONS_JSON, json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    result = _run(opts, model, tokenizer, remove, windows, judge)
    _echo_result(result, opts["quiet"])
    judge.measure("pruned", model, tokenizer)
    judge.write(opts["out_dir"])
    if not opts["no_report"]:
        from depthprobe.report import write_report

        write_report([opts["out_dir"]], f"{opts['out_dir']}/{REPORT_HTML}")
    click.echo(f"Pruned model written to {opts['out_dir']}/", err=True)


def _run(opts: dict, model, tokenizer, remove, windows, judge: PruneJudge):
    """The original's evaluation, then the prune itself; each finished step is journaled in --out."""
    from depthprobe.prune import prune

    out = opts["out_dir"]
    keeps(None)
    judge.measure("original", model, tokenizer)
    keeps("every finished step (original model's evaluation, drop-sweep batches, greedy steps)", out)
    return prune(model, tokenizer, remove=remove, num_layers=opts["num_layers"],
                 strategy=opts["strategy"] if remove is None else "manual", curve=opts["curve"],
                 curve_max=opts["curve_max"], out_dir=out, resume=opts["resume"], heldout=opts["heldout"],
                 eval_text_file=opts["eval_text_file"], eval_dataset=opts["eval_dataset"],
                 heldout_windows=opts["heldout_windows"], seam=_seam_options(opts), windows=windows,
                 **analysis_kwargs(opts))


def _check_resume_options(opts: dict) -> dict:
    """The options this prune records; with ``--resume``, refused in one line when they differ
    from the interrupted run's (``prune_options.json``)."""
    return checked_resume_options(opts, OPTIONS_JSON, _NOT_RECORDED)


def _echo_result(result, quiet: bool) -> None:
    """What was removed, the loss before -> after, the curve (unless ``quiet``), the seam."""
    s = result.summary()
    click.echo(f"removed blocks {s['removed']} ({s['num_layers_before']} -> {s['num_layers_after']})")
    if s["objective"] == "lm_loss":
        click.echo(
            f"loss {s['loss_before']:.4f} -> {s['loss_after']:.4f}   "
            f"perplexity {s['perplexity_before']:.2f} -> {s['perplexity_after']:.2f}"
        )
    else:
        click.echo(f"final-state cosine drift {s['loss_before']:.4g} -> {s['loss_after']:.4g}")
    print_heldout(s)
    if result.curve is not None and not quiet:
        click.echo(result.curve.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        at_k = result.excess[result.excess["K"] == result.excess["K"].max()]
        click.echo("loss above greedy's at K = " + ", ".join(
            f"{row.strategy} {row.excess:+.4f}" for row in at_k.itertuples(index=False)))
    if result.seam is not None and result.seam.spans is not None:
        for row in result.seam.spans[~result.seam.spans["applied"]].itertuples():
            click.echo(f"  repair of blocks {row.start}..{row.stop - 1} declined: {row.reason}")


def _seam_options(opts: dict):
    """``SeamOptions`` from --repair / --heal (None when neither is asked)."""
    from depthprobe.prune import HealConfig, SeamOptions

    if opts["repair"] is None and opts["heal"] is None:
        return None
    heal = HealConfig(steps=opts["heal_steps"], rank=opts["heal_rank"], lr=opts["heal_lr"],
                      targets=opts["heal_modules"], batch_size=opts["batch_size"])
    return SeamOptions(repair=opts["repair"], heal=opts["heal"], repair_windows=opts["repair_windows"],
                       ridges=tuple(parse_list(opts["repair_ridge"], "--repair-ridge", float, "0.001,0.01")),
                       repair_after=opts["repair_after"], heal_config=heal, heal_text_file=opts["heal_text_file"],
                       batch_size=opts["batch_size"])
