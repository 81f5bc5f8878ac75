"""`depthprobe lens train`: train a tuned lens (tuned-lens's recipe) and save it where
tuned-lens's own ``TunedLens.from_model_and_pretrained`` loads it."""

from __future__ import annotations

import click

from depthprobe.cli.options import (
    common_options,
    load_from_options,
    model_options,
    open_from_options,
    refuse_existing_out,
    setup_logging,
)
from depthprobe.safeio import locks_out


@click.group("lens", context_settings={"help_option_names": ["-h", "--help"]})
def command() -> None:
    """Tuned lenses: train one per model, then `analyze --metrics tuned-lens --lens DIR`.

    \b
    Examples:
      depthprobe lens train smollm2 --steps 20 --num-sequences 4 --seq-len 256 --out lenses/smol
      depthprobe analyze smollm2 --metrics lens,tuned-lens --lens lenses/smol --out runs/smol-lens
    """


@command.command("train")
@model_options
@click.option("--text-file", type=click.Path(dir_okay=False), default=None,
              help="Train on this text (default: the built-in text past the calibration tokens).")
@click.option("--dataset", default=None, help="datasets name NAME[:CONFIG[:SPLIT]] or a local folder.")
@click.option("--steps", type=int, default=250, show_default=True, help="Optimizer steps.")
@click.option("--num-sequences", type=int, default=None,
              help="Windows per step [default: 2^18 tokens / --seq-len, tuned-lens's 262144 tokens per step].")
@click.option("--seq-len", type=int, default=2048, show_default=True, help="Tokens per window.")
@click.option("--batch-size", type=int, default=1, show_default=True,
              help="Windows per forward pass (gradients accumulate up to --num-sequences).")
@click.option("--lr-scale", type=float, default=1.0, show_default=True, help="lr = lr-scale x (1 - momentum 0.9).")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the window order.")
@click.option("--precision", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="bf16: the lens and head under bfloat16 autocast, as tuned-lens; fp32: none.")
@click.option("--checkpoint-every", type=int, default=25, show_default=True, help="Checkpoint every k steps.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Folder for the lens.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --out.")
@click.option("--force", is_flag=True, help="Train again into a non-empty --out.")
@common_options
@locks_out()
def train(**opts) -> None:
    """Train a tuned lens for MODEL: one affine translator per block, by KL to the final logits.

    \b
    Examples:
      depthprobe lens train smollm2 --out lenses/smol                    # tuned-lens's 250 x 2^18 tokens
      depthprobe lens train smollm2 --steps 20 --num-sequences 4 --seq-len 256 --out lenses/smol-small
      depthprobe lens train ./my-model --text-file corpus.txt --out lenses/mine --resume
      torchrun --nproc_per_node 4 -m depthprobe lens train smollm2 --out lenses/smol   # windows split
      depthprobe analyze smollm2 --metrics lens,tuned-lens --lens lenses/smol --out runs/smol
    """
    from depthprobe import distributed

    refuse_existing_out(opts["out_dir"], opts["force"] or opts["resume"],
                        "--resume to continue the lens there, or --force to train again")
    started = distributed.init_from_env(opts["device"])
    try:
        _train(opts)
    finally:
        if started:
            import torch

            torch.distributed.destroy_process_group()


def _train(opts: dict) -> None:
    from depthprobe import distributed
    from depthprobe.analysis import max_positions
    from depthprobe.model.stack import LayerStack
    from depthprobe.probes.lens_train import LensTrainConfig, LensTrainer, lens_text

    setup_logging(opts["verbose"])
    config = LensTrainConfig(steps=opts["steps"], num_sequences=opts["num_sequences"], seq_len=opts["seq_len"],
                             batch_size=opts["batch_size"], lr_scale=opts["lr_scale"], seed=opts["seed"],
                             checkpoint_every=opts["checkpoint_every"], text_file=opts["text_file"],
                             dataset=opts["dataset"], precision=opts["precision"])
    opts["metrics"] = "lens"
    _, tokenizer = open_from_options(opts)
    model, tokenizer = load_from_options(opts, tokenizer)
    stack = LayerStack.from_model(model, opts["layers_path"])
    if stack.head is None:
        from depthprobe.errors import DepthprobeError

        raise DepthprobeError(f"{opts['model']} has no LM head: a tuned lens reads logits; give a causal LM")
    text = lens_text(tokenizer, config, max_positions(model))
    trainer = LensTrainer(stack, text, config, opts["out_dir"])
    if opts["resume"]:
        trainer.resume()
    trainer.fit(progress=not opts["quiet"])
    if distributed.is_main():
        kl = [r["kl"] for r in trainer.rows if r["step"] == trainer.step]
        click.echo(f"Lens written to {opts['out_dir']}/ ({trainer.step} steps; trained on {text.info['description']}; "
                   f"last step's mean KL {sum(kl) / max(1, len(kl)):.4f} nats)", err=True)
