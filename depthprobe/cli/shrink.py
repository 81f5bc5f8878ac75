"""`depthprobe shrink`: a smaller model to a target, cut at block and sublayer granularity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from depthprobe.cli import preflight
from depthprobe.cli.evaluate_options import PruneJudge, heldout_options, judge_options, quiet_harness
from depthprobe.cli.interrupts import keeps
from depthprobe.cli.options import (
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
from depthprobe.config import DEFAULT_REMEASURE
from depthprobe.errors import DepthprobeError
from depthprobe.runs import REPORT_HTML
from depthprobe.safeio import atomic_write_text, locks_out

OPTIONS_JSON = "shrink_options.json"
#: options that change neither the search nor where it stops
_NOT_RECORDED = ("quiet", "verbose", "resume", "force", "no_report", "dry_run", "out_dir")


@click.command("shrink")
@model_options
@data_options
@click.option("--target-params", type=float, default=None, help="Fraction of the parameters kept, e.g. 0.8.")
@click.option("--target-speedup", type=float, default=None,
              help="Tokens/s against the original (--speedup-on), measured with bench on this machine, e.g. 1.2.")
@click.option("--speedup-on", type=click.Choice(["prefill", "decode"]), default="decode", show_default=True,
              help="Which speed --target-speedup means.")
@click.option("--max-loss-increase", type=float, default=None,
              help="Stop before the held-out loss rises more than X nats above the full model's.")
@click.option("--units", default="block,attn,mlp", show_default=True,
              help="What may be removed: block (whole blocks), attn (attention-only), mlp (MLP-only).")
@click.option("--remeasure", default=str(DEFAULT_REMEASURE), show_default=True,
              help="Re-measure the N candidates with the least damage per parameter when last measured at each step "
                   "(lazy greedy: a full sweep at the first step and at the step that reaches the target); "
                   "'all' re-measures every candidate at every step (exact greedy, about 90/N times the search time).")
@click.option("--baselines/--no-baselines", default=True, show_default=True,
              help="Measure the block-only baselines (greedy, Gromov block, ShortGPT, last blocks) into shrink_curve.csv.")
@click.option("--check-calibration", type=click.Path(dir_okay=False), default=None,
              help="Rerun the unit ranking on this second text and report the overlap of the chosen units.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Folder for the shrunk model.")
@click.option("--resume", is_flag=True, help="Continue an interrupted shrink in --out instead of restarting.")
@click.option("--no-report", is_flag=True, help="Do not write report.html.")
@click.option("--force", is_flag=True, help="Write into an existing, non-empty --out.")
@heldout_options
@judge_options
@common_options
@locks_out()
def command(**opts) -> None:
    """Shrink MODEL to a target by removing whole blocks, attention-only and MLP-only sublayers.

    Greedy, one unit at a time: every step re-measures the leading units' damage (the
    calibration loss without it, from the prefix-cached drop sweep of the model as it is now;
    every unit with --remeasure all), removes the one with the least damage per parameter, and
    checks it on held-out windows. With --target-params it also starts from the block-only
    greedy's blocks but its last and keeps the start with the lower calibration loss.
    --out holds the model (it loads with AutoModelForCausalLM.from_pretrained, no remote code;
    with a sublayer removed, once depthprobe is imported), shrink.json, shrink_curve.csv (every
    step of the shrink and of each block-only baseline: loss, held-out loss, parameters, speed
    where measured), shrink_steps.csv and report.html.

    \b
    Examples:
      depthprobe shrink smollm2 --target-params 0.8 --out runs/smol-80
      depthprobe shrink smollm2 --max-loss-increase 0.3 --units attn,mlp --out runs/smol-sub
      depthprobe shrink smollm2 --target-params 0.8 --eval-tasks depthprobe_cloze,depthprobe_recall --out runs/smol-80
      depthprobe shrink smollm2 --target-speedup 1.2 --speedup-on prefill --out runs/smol-fast
    """
    units = _check(opts)
    refuse_existing_out(opts["out_dir"], opts["force"] or opts["resume"], "--force to write into it, or --resume to continue")
    recorded = _check_resume_options(opts)
    setup_logging(opts["verbose"])
    quiet_harness(opts["verbose"])
    judge = PruneJudge(opts, fingerprint=json.dumps(recorded, sort_keys=True))
    judge.check()
    config, tokenizer = open_from_options(opts)
    preflight.check_config(opts, config)
    preflight.check_shrink_config(opts, config)
    windows = preflight.calibration_windows(opts, tokenizer, config)
    model, tokenizer = load_from_options(opts, tokenizer)
    out = Path(opts["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / OPTIONS_JSON, json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    keeps(None)
    judge.measure("original", model, tokenizer)
    keeps("every finished step (the original's evaluation, baseline and shrink steps)", str(out))
    result = _run(opts, model, tokenizer, windows, units)
    _echo(result, opts["quiet"])
    shrunk, tokenizer = _reload(opts)
    judge.measure("shrunk", shrunk, tokenizer)
    judge.write(opts["out_dir"])
    if opts["check_calibration"]:
        _check_calibration(opts, result, units)
    if not opts["no_report"]:
        from depthprobe.report.shrink_page import write_shrink_report

        write_shrink_report(out, out / REPORT_HTML)
    click.echo(f"Shrunk model written to {opts['out_dir']}/ ({result.export['needs']})", err=True)


def _check(opts: dict) -> tuple[str, ...]:
    """Every option that needs no model, in one line each."""
    from depthprobe.prune.shrink import check_targets

    check_targets(opts["target_params"], opts["max_loss_increase"], opts["target_speedup"])
    if opts["target_speedup"] is not None and not opts["target_speedup"] > 1:
        raise DepthprobeError(f"--target-speedup must be above 1 (got {opts['target_speedup']})")
    if opts["target_speedup"] is not None and (opts["device_map"] or opts["offload_folder"]):
        raise DepthprobeError("--target-speedup cannot be measured with weights offloaded (--device-map / "
                              "--offload-folder): the timings would be of the transfers; drop those or use --target-params")
    preflight.check_options(opts)
    opts["remeasure"] = parse_remeasure(opts["remeasure"])
    preflight.at_least(opts, {"heldout_windows": 1, "remeasure": 1, "eval_limit": 1, "bench_new_tokens": 1, "bench_repeats": 1})
    if not opts["heldout"] and opts["max_loss_increase"] is not None:
        raise DepthprobeError("--max-loss-increase is judged on held-out windows; drop --no-heldout")
    if opts["eval_text_file"] and opts["eval_dataset"]:
        raise DepthprobeError("give at most one of --eval-text-file and --eval-dataset")
    preflight.check_text_file(opts["eval_text_file"], "--eval-text-file")
    preflight.check_text_file(opts["check_calibration"], "--check-calibration")
    units = tuple(dict.fromkeys(parse_list(opts["units"], "--units", str, "block,attn,mlp")))
    bad = [u for u in units if u not in ("block", "attn", "mlp")]
    if bad or not units:
        raise DepthprobeError(f"--units takes block, attn and mlp (got {opts['units']!r})")
    return units


def parse_remeasure(value) -> int | None:
    """``--remeasure``: a count of candidates, or ``all`` (None: every candidate, exact greedy)."""
    text = str(value).strip().lower()
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise DepthprobeError(f"--remeasure takes a number of candidates or 'all' (got {value!r})") from None


def _check_resume_options(opts: dict) -> dict:
    """A --resume must search the same way (the target may change: the steps do not depend on it)."""
    search = ("model", "text_file", "dataset", "num_sequences", "seq_len", "batch_size", "units", "heldout_windows",
              "remeasure", "eval_text_file", "eval_dataset", "dtype", "layers_path", "gguf_file")
    return checked_resume_options(opts, OPTIONS_JSON, _NOT_RECORDED, search)


def _config(opts: dict, units, text_file=None):
    from depthprobe.config import ProbeConfig
    from depthprobe.prune.shrink import ShrinkConfig

    probe = ProbeConfig(num_sequences=opts["num_sequences"], seq_len=opts["seq_len"], batch_size=opts["batch_size"],
                        text_file=text_file or opts["text_file"], dataset=None if text_file else opts["dataset"],
                        layers_path=opts["layers_path"])
    return ShrinkConfig(target_params=opts["target_params"], max_loss_increase=opts["max_loss_increase"],
                        target_speedup=opts["target_speedup"], speedup_on=opts["speedup_on"], units=units,
                        remeasure=opts["remeasure"], baselines=opts["baselines"] and text_file is None, heldout=opts["heldout"],
                        heldout_windows=opts["heldout_windows"], eval_text_file=opts["eval_text_file"],
                        eval_dataset=opts["eval_dataset"], probe=probe)


def _run(opts: dict, model, tokenizer, windows, units):
    from depthprobe.config import RunOptions
    from depthprobe.prune.shrink import shrink

    return shrink(model, tokenizer, _config(opts, units), windows=windows, out_dir=opts["out_dir"],
                  run=RunOptions(progress=not opts["quiet"], resume=opts["resume"]))


def _reload(opts: dict):
    """The exported folder, loaded as a user would: what --eval-tasks and --bench judge."""
    from depthprobe.model.load import LoadOptions, load_model

    return load_model(opts["out_dir"], LoadOptions(dtype=opts["dtype"], device=opts["device"]))


def _check_calibration(opts: dict, result, units) -> None:
    """The ranking rerun on the second text, from a fresh copy of the model; the overlap."""
    from depthprobe.config import RunOptions
    from depthprobe.prune.shrink import calibration_overlap, record_calibration_check, shrink

    model, tokenizer = load_from_options(dict(opts), None)
    other = shrink(model, tokenizer, _config(opts, units, text_file=opts["check_calibration"]),
                   run=RunOptions(progress=not opts["quiet"]))
    check = calibration_overlap(result.removed, other.removed, opts["check_calibration"])
    record_calibration_check(opts["out_dir"], check)
    click.echo(f"calibration check on {opts['check_calibration']}: {check['shared']} of {len(result.removed)} units "
               f"shared (Jaccard {check['jaccard']:.2f}); only here: {', '.join(check['only_first']) or '-'}; "
               f"only there: {', '.join(check['only_second']) or '-'}")


def _echo(result, quiet: bool) -> None:
    s = result.summary()
    click.echo(f"removed {len(s['removed'])} units: {', '.join(s['removed'])} (stopped: {s['stopped']})")
    click.echo(f"parameters {s['params_before']:,} -> {s['params_after']:,} ({s['params_fraction']:.4f} kept); "
               f"blocks {s['num_layers_before']} -> {s['num_layers_after']}")
    click.echo(f"loss {s['loss_before']:.6f} -> {s['loss_after']:.6f}   perplexity {s['perplexity_before']:.2f} -> "
               f"{s['perplexity_after']:.2f}")
    if "heldout_loss_before" in s:
        lo_b, hi_b = s["heldout_loss_before_interval"]
        lo_a, hi_a = s["heldout_loss_after_interval"]
        click.echo(f"held-out loss {s['heldout_loss_before']:.6f} [{lo_b:.4f}, {hi_b:.4f}] -> "
                   f"{s['heldout_loss_after']:.6f} [{lo_a:.4f}, {hi_a:.4f}]   ({s['heldout_source']})")
    best = s["block_only_best"]
    if best is not None and "heldout_loss_after" in s:
        verdict = "at or below" if s["heldout_at_or_below_block_only"] else "ABOVE"
        misses = s.get("target_params") is not None and best["params"] > s["target_params"]
        click.echo(f"best block-only at >= {s['params_after']:,} parameters: {best['strategy']} K={best['step']} "
                   f"({best['params']:,} parameters{', misses the target' if misses else ''}) held-out "
                   f"{best['heldout_loss']:.6f}; shrink is {verdict} it")
    at_target = s.get("block_only_at_target")
    if at_target is not None and "heldout_loss_after" in s:
        verdict = "at or below" if s["heldout_at_or_below_block_only_at_target"] else "ABOVE"
        click.echo(f"best block-only that reaches the target: {at_target['strategy']} K={at_target['step']} "
                   f"({at_target['params']:,} parameters) held-out {at_target['heldout_loss']:.6f}; "
                   f"shrink is {verdict} it")
    speed = s.get("speed")
    if speed:
        click.echo(f"measured {speed['speedup_on']} speedup {speed['speedup']:.3f}x (target {speed['target']})")
    if not quiet and not math.isnan(s["loss_after"]):
        click.echo(result.curve[result.curve["strategy"] == "shrink"][["step", "unit", "loss", "heldout_loss",
                                                                        "params_fraction"]]
                   .to_string(index=False, float_format=lambda v: f"{v:.4f}"))
