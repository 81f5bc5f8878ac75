"""`depthprobe convert`: a Pre-LN model's equivalent Pre-RMSNorm / Pre-CRMSNorm twin."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from depthprobe.cli.choices import CONVERT_KINDS as KINDS
from depthprobe.cli.options import load_from_options, model_options, refuse_existing_out, setup_logging
from depthprobe.errors import DepthprobeError
from depthprobe.safeio import locks_out


@click.command("convert")
@model_options
@click.option("--to", "to", type=click.Choice(list(KINDS)), required=True, help="Target norm.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="New folder for the model.")
@click.option("--check", is_flag=True, help="Reload the folder and print max |delta logit| on the built-in text.")
@click.option("-v", "--verbose", is_flag=True, help="Log what depthprobe does.")
@locks_out()  # one command at a time per --out; a killed one leaves no stuck lock
def command(**opts) -> None:
    """Convert a Pre-LN MODEL (GPT-2, GPT-NeoX, OPT, Phi) to its equivalent Pre-RMSNorm or
    Pre-CRMSNorm form (Jiang et al., 2023): same logits, cheaper norms.

    LayerNorm gains and biases are folded into the linears that read them, the residual
    stream is made zero-mean, and each LayerNorm becomes an RMSNorm (CRMSNorm also stores
    the stream with d-1 coordinates). The folder reloads with `depthprobe analyze OUT` or
    depthprobe.load_model(OUT).

    \b
    Examples:
      depthprobe convert gpt2 --to rmsnorm --out gpt2-rms --check
      depthprobe convert ./my-pre-ln-model --to crmsnorm --out my-crms --dtype float64 --check
      depthprobe analyze gpt2-rms --out runs/gpt2-rms
    """
    from depthprobe.convert import convert, save_converted

    setup_logging(opts["verbose"])
    if opts["layers_path"]:
        raise DepthprobeError("convert reads each family's layout from its table; drop --layers-path")
    out = Path(opts["out_dir"])
    refuse_existing_out(opts["out_dir"], allowed=False, how=None)
    model, tokenizer = load_from_options(opts)
    converted = convert(model, opts["to"])
    save_converted(converted, tokenizer, out)
    del converted
    click.echo(f"Pre-{opts['to']} model written to {out}/", err=True)
    if opts["check"] and not _check(model, tokenizer, out, opts):
        sys.exit(1)


def _check(model, tokenizer, out: Path, opts: dict) -> bool:
    """Reload ``out`` and compare its logits with the original's; print and return the verdict."""
    from depthprobe.convert import logit_delta, tolerance
    from depthprobe.data import make_windows
    from depthprobe.model.load import load_model

    reloaded, _ = load_model(out, dtype=opts["dtype"], device=opts["device"])
    max_positions = getattr(model.config, "max_position_embeddings", None)
    windows = make_windows(tokenizer, num_sequences=2, seq_len=min(128, max_positions or 128))
    delta = logit_delta(model, reloaded, windows.input_ids)
    kind, limit = tolerance(opts["dtype"])
    measured = delta.max_abs if kind == "abs" else delta.max_rel
    ok = measured <= limit
    click.echo(
        f"check ({opts['dtype']}, {delta.num_tokens} tokens of built-in text, original vs reloaded {out}):\n"
        f"  max |delta logit| = {delta.max_abs:.3e}   relative (/ max |logit|) = {delta.max_rel:.3e}\n"
        f"  {'OK' if ok else 'FAILED'}: {kind} tolerance {limit:g}"
    )
    return ok
