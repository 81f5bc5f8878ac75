"""Options shared by several commands, defined once (model source, calibration data, output)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from depthprobe.config import DEFAULT_BATCH_SIZE, DEFAULT_NUM_SEQUENCES, DEFAULT_SEQ_LEN
from depthprobe.errors import DepthprobeError
from depthprobe.model.load import DTYPES
from depthprobe.safeio import LOCK_NAME


def _stack(*decorators):
    def apply(func):
        for dec in reversed(decorators):
            func = dec(func)
        return func

    return apply


_device_option = click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N, mps or auto.")
_trust_remote_code_option = click.option("--trust-remote-code", is_flag=True,
                                         help="Run the model repo's own code (off by default).")

model_options = _stack(
    click.argument("model"),
    click.option("--gguf-file", default=None, help="GGUF file name inside MODEL (a folder or hub repo)."),
    click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default="auto", show_default=True,
                 help="auto: float32 when the memory plan fits, else the checkpoint's dtype (said in one line)."),
    _device_option,
    click.option("--device-map", default=None,
                 help="accelerate placement: auto, balanced, balanced_low_0 or sequential (multi-GPU, offload)."),
    click.option("--max-memory", default=None,
                 help="Per-device budget for --device-map, e.g. 0:70GiB,cpu:20GiB (implies --device-map auto)."),
    click.option("--offload-folder", type=click.Path(file_okay=False), default=None,
                 help="Folder for weights that fit in no budget (disk offload; implies --device-map auto)."),
    click.option("--dry-run", is_flag=True, help="Print the memory plan (weights, gradients, activations, "
                 "peak vs available) and exit without loading."),
    click.option("--revision", default=None, help="Hub revision (branch, tag or commit)."),
    _trust_remote_code_option,
    click.option("--layers-path", default=None, help="Dotted path of the block list, e.g. model.layers."),
)

#: commands that load several models as they are and time or score them (eval, bench)
plain_model_options = _stack(
    click.option("--dtype", type=click.Choice(list(DTYPES)), default="float32", show_default=True),
    _device_option,
    _trust_remote_code_option,
)

data_options = _stack(
    click.option("--text-file", type=click.Path(dir_okay=False), default=None, help="Calibration text file."),
    click.option("--dataset", default=None, help="datasets name NAME[:CONFIG[:SPLIT]] or a local folder."),
    click.option("--num-sequences", type=int, default=DEFAULT_NUM_SEQUENCES, show_default=True,
                 help="Number of windows N."),
    click.option("--seq-len", type=int, default=DEFAULT_SEQ_LEN, show_default=True, help="Tokens per window T."),
    click.option("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, show_default=True,
                 help="Windows per forward pass."),
)

common_options = _stack(
    click.option("-q", "--quiet", is_flag=True, help="No progress bar and no table."),
    click.option("-v", "--verbose", is_flag=True, help="Log what depthprobe does."),
)


def refuse_existing_out(out_dir: str, allowed: bool, how: str | None = "--force to write into it") -> None:
    """An existing, non-empty ``--out`` is kept unless the user says otherwise; the command's
    own lock file (taken before this check) does not count."""
    out = Path(out_dir)
    if not allowed and out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):
        advice = f", or pass {how}" if how else ""
        raise DepthprobeError(f"--out {out_dir} exists and is not empty; choose a new folder{advice}")


def load_from_options(opts: dict):
    """(model, tokenizer) from the parsed ``model_options``; with ``--dry-run``, print the
    memory plan and exit 0 before loading."""
    from depthprobe.model.load import load_model, plan_load
    from depthprobe.model.memory import check_offload_supports

    model_args = {key: opts[key] for key in ("gguf_file", "dtype", "device", "device_map", "max_memory",
                                             "offload_folder", "revision", "trust_remote_code")}
    workload = _workload(opts)
    if opts.get("dry_run"):
        plan, note = plan_load(opts["model"], workload=workload, **model_args)
        click.echo(plan.format())
        if note:
            click.echo(note)
        raise click.exceptions.Exit(0)
    model, tokenizer = load_model(opts["model"], workload=workload, **model_args)
    check_offload_supports(model, workload.metrics)
    # later steps (convert --check) reuse the dtype actually chosen by --dtype auto
    opts["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    return model, tokenizer


def _workload(opts: dict):
    """What the memory plan assumes: this command's metrics and batch tokens."""
    from depthprobe.model.memory import Workload, metrics_of

    metrics = metrics_of(opts["metrics"]) if opts.get("metrics") else ("angular", "drop")
    return Workload(metrics=metrics, batch_size=opts.get("batch_size", 4), seq_len=opts.get("seq_len", 256),
                    num_sequences=opts.get("num_sequences", 8))


def analysis_kwargs(opts: dict) -> dict:
    """Keyword arguments for ``depthprobe.analyze`` (and ``prune``) from the parsed
    ``data_options`` and ``model_options``."""
    return {
        "num_sequences": opts["num_sequences"],
        "seq_len": opts["seq_len"],
        "batch_size": opts["batch_size"],
        "text_file": opts["text_file"],
        "dataset": opts["dataset"],
        "layers_path": opts["layers_path"],
        "model_name": opts["model"],
        "progress": not opts["quiet"],
    }


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
