"""`depthprobe train`: train one small LM with a chosen norm placement."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from depthprobe.cli.options import _stack, common_options, refuse_existing_out, setup_logging
from depthprobe.runs import ANALYSIS_DIR, REPORT_HTML
from depthprobe.safeio import locks_out
from depthprobe.train.model import NORM_TYPES, PLACEMENT_NAMES, PRESETS

PRESET_NAMES = list(PRESETS)

#: options shared by `train` and `compare` (model shape, optimisation, data)
train_options = _stack(
    click.option("--preset", type=click.Choice(PRESET_NAMES), default="tiny", show_default=True, help="Model size."),
    click.option("--norm-type", type=click.Choice(list(NORM_TYPES)), default="rms", show_default=True),
    click.option("--mix-alpha", type=float, default=0.25, show_default=True, help="mix: fraction of Post-LN blocks."),
    click.option("--tie-embeddings/--untie-embeddings", default=False, show_default=True, help="Head shares embeddings."),
    click.option("--no-deepnorm-init", is_flag=True, help="deepnorm: keep the plain init."),
    click.option("--dyt-alpha0", type=float, default=0.5, show_default=True, help="dyt: initial alpha of DyT."),
    click.option("--steps", type=int, default=200, show_default=True, help="Optimizer steps."),
    click.option("--batch-size", type=int, default=16, show_default=True, help="Sequences per step (global)."),
    click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per step."),
    click.option("--seq-len", type=int, default=128, show_default=True),
    click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak learning rate."),
    click.option("--min-lr-ratio", type=float, default=0.1, show_default=True, help="Cosine floor (x peak)."),
    click.option("--warmup", "warmup_steps", type=int, default=20, show_default=True, help="Warmup steps."),
    click.option("--weight-decay", type=float, default=0.1, show_default=True),
    click.option("--grad-clip", type=float, default=1.0, show_default=True, help="0 disables clipping."),
    click.option("--eval-every", type=int, default=50, show_default=True, help="Validation loss every k steps."),
    click.option("--diag-every", type=int, default=50, show_default=True, help="Per-layer diagnostics every k steps."),
    click.option("--ckpt-every", type=int, default=100, show_default=True, help="Checkpoint every k steps."),
    click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N, mps or auto."),
    click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True),
    click.option("--tokenizer", default=None, help="HF tokenizer name or folder (default: bytes)."),
    click.option("--text-file", type=click.Path(dir_okay=False), default=None, help="Train on this text."),
    click.option("--dataset", default=None, help="datasets NAME[:CONFIG[:SPLIT]], streamed."),
    click.option("--max-tokens", type=int, default=4_000_000, show_default=True, help="Corpus size in tokens."),
    click.option("--val-windows", type=int, default=32, show_default=True, help="Held-out windows."),
)


def configs_from_options(opts: dict, norm: str, seed: int):
    """``(ModelConfig, TrainConfig, DataConfig)`` from parsed ``train_options``."""
    from depthprobe.train.data import DataConfig
    from depthprobe.train.model import PRESETS, ModelConfig
    from depthprobe.train.trainer import TrainConfig

    model = ModelConfig(
        **PRESETS[opts["preset"]],
        norm_placement=norm,
        norm_type=opts["norm_type"],
        mix_alpha=opts["mix_alpha"],
        tie_word_embeddings=opts["tie_embeddings"],
        deepnorm_init=not opts["no_deepnorm_init"],
        dyt_alpha0=opts["dyt_alpha0"],
        max_position_embeddings=max(256, opts["seq_len"]),
    )
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    train = TrainConfig(**{k: v for k, v in opts.items() if k in names and k != "seed"}, seed=seed)
    data_names = {f.name for f in dataclasses.fields(DataConfig)}
    data = DataConfig(**{k: v for k, v in opts.items() if k in data_names})
    return model, train, data


@click.command("train")
@click.option(
    "--norm",
    type=click.Choice(list(PLACEMENT_NAMES)),
    default="pre",
    show_default=True,
    help="Where the normalization sits.",
)
@train_options
@click.option("--seed", type=int, default=0, show_default=True, help="Fixes init and data order.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Run folder.")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt.")
@click.option("--force", is_flag=True, help="Start a new run in an existing, non-empty OUT.")
@click.option("--no-report", is_flag=True, help="Do not analyze the final model into OUT/report.html.")
@common_options
@locks_out()  # one command at a time per --out; a killed one leaves no stuck lock
def command(**opts) -> None:
    """Train a small decoder LM with one normalization placement.

    Writes OUT/metrics.csv, OUT/train_layers.csv, OUT/config.json, OUT/run.json,
    OUT/checkpoint.pt and OUT/model (load it with `depthprobe analyze OUT/model`).
    Under torchrun it trains with DDP (gloo on CPU, nccl on GPU).

    \b
    Examples:
      depthprobe train --norm mix --preset tiny --steps 200 --seed 0 --out runs/mix
      depthprobe train --norm post --preset cpu-small --steps 300 --out runs/post --resume
      depthprobe train --norm lns --preset 130m --dataset allenai/c4:en --tokenizer gpt2 \\
          --seq-len 256 --batch-size 512 --grad-accum 8 --steps 10000 --device cuda --out runs/lns
      torchrun --nproc_per_node=8 -m depthprobe train --norm pre --preset 250m --out runs/pre
    """
    from depthprobe.train.trainer import Trainer

    setup_logging(opts["verbose"])
    refuse_existing_out(opts["out_dir"], opts["resume"] or opts["force"],
                        "--resume to continue that run, or --force to start a new one there")
    model_cfg, train_cfg, data_cfg = configs_from_options(opts, opts["norm"], opts["seed"])
    trainer = Trainer(model_cfg, train_cfg, data_cfg, opts["out_dir"], resume=opts["resume"], progress=not opts["quiet"])
    result = trainer.fit()
    if not trainer.dist.main:
        return
    state = "DIVERGED" if result.diverged else "done"
    click.echo(
        f"{opts['norm']}: {state} after {result.steps_done} steps, val loss {result.final_val_loss:.4f} "
        f"(ppl {result.final_val_ppl:.2f}), {result.seconds:.1f} s",
        err=True,
    )
    if not opts["no_report"] and not result.diverged:
        _report(trainer, opts)
    click.echo(f"Run written to {opts['out_dir']}/", err=True)


def _report(trainer, opts: dict) -> None:
    from depthprobe.report import write_report
    from depthprobe.train.compare import analyze_run

    result = analyze_run(trainer.model, trainer.data, metrics="angular,variance,grad,lens", progress=not opts["quiet"])
    out = result.save(Path(opts["out_dir"]) / ANALYSIS_DIR).parent
    write_report([out], out / REPORT_HTML)  # the run folder: analysis plus training curves
