"""Options shared by several commands, defined once (model source, calibration data, output)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from depthprobe.cli.choices import DTYPE_NAMES as DTYPES
from depthprobe.config import DEFAULT_BATCH_SIZE, DEFAULT_NUM_SEQUENCES, DEFAULT_SEQ_LEN
from depthprobe.errors import DepthprobeError
from depthprobe.safeio import LOCK_NAME

#: the options of ``model_options`` that are :class:`~depthprobe.model.load.LoadOptions` fields
LOAD_OPTION_NAMES = ("gguf_file", "dtype", "device", "device_map", "max_memory", "offload_folder", "revision",
                     "trust_remote_code")


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


#: what an analyze folder holds besides the files its summary.json lists (older runs list none)
ANALYZE_FILES = ("layers.csv", "angular_distance.csv", "summary.json", "report.html", "drop_progress.jsonl")


def owned_outputs(out_dir: str) -> set[str]:
    """The files of the run in ``out_dir``: those its ``summary.json`` lists, its report and
    progress file (without a summary, the fixed analyze names)."""
    import json

    out = Path(out_dir)
    owned = set(ANALYZE_FILES)
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        summary = None
    if isinstance(summary, dict):  # an older summary lists no files: every table there is the run's
        owned |= set(summary["files"]) if "files" in summary else {p.name for p in out.glob("*.csv")}
    return {name for name in owned if Path(name).name == name}  # names in the folder itself, never a path


def clear_owned_outputs(out_dir: str, names: set[str]) -> list[str]:
    """``analyze --force``, once the new run is saved: remove the old run's files ``names``
    that the new run did not write, so the folder holds exactly one run (and a failed run
    leaves the old one whole). Anything else there is left alone. Returns what was removed."""
    removed = []
    for name in sorted(names):
        path = Path(out_dir) / name
        if path.is_file():
            path.unlink()
            removed.append(name)
    return removed


def load_options(opts: dict):
    """:class:`~depthprobe.model.load.LoadOptions` from the parsed ``model_options``."""
    from depthprobe.model.load import LoadOptions

    return LoadOptions(**{key: opts[key] for key in LOAD_OPTION_NAMES})


def open_from_options(opts: dict):
    """``(config, tokenizer)`` of ``MODEL``, no weight read; with ``--dry-run``, print the
    memory plan and exit 0."""
    from depthprobe.model.load import open_source, plan_load

    if opts.get("dry_run"):
        plan, note = plan_load(opts["model"], load_options(opts), workload=_workload(opts))
        click.echo(plan.format())
        if note:
            click.echo(note)
        raise click.exceptions.Exit(0)
    return open_source(opts["model"], load_options(opts))


def load_from_options(opts: dict, tokenizer=None):
    """(model, tokenizer) from the parsed ``model_options`` (``tokenizer`` from
    :func:`open_from_options`, not loaded twice)."""
    from depthprobe.model.load import load_model
    from depthprobe.model.offload import check_offload_supports

    workload = _workload(opts)
    if opts.get("dry_run"):
        open_from_options(opts)
    model, tokenizer = load_model(opts["model"], load_options(opts), workload=workload, tokenizer=tokenizer)
    check_offload_supports(model, workload.metrics)
    # later steps (convert --check) reuse the dtype actually chosen by --dtype auto
    opts["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    return model, tokenizer


def _workload(opts: dict):
    """What the memory plan assumes: this command's metrics and batch tokens."""
    from depthprobe.config import ProbeConfig
    from depthprobe.model.memory import metrics_of

    metrics = metrics_of(opts["metrics"]) if opts.get("metrics") else ("angular", "drop")
    return ProbeConfig(metrics=metrics, batch_size=opts.get("batch_size", DEFAULT_BATCH_SIZE),
                       seq_len=opts.get("seq_len", DEFAULT_SEQ_LEN),
                       num_sequences=opts.get("num_sequences", DEFAULT_NUM_SEQUENCES))


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


def save_run(result, opts: dict) -> None:
    """Write a run to ``--out``: its tables and ``summary.json`` (``result.save``), the report
    unless ``--no-report``, then (``--force``) remove the old run's files ``opts["stale"]``
    that this run did not write, so the folder holds exactly one run."""
    from depthprobe.report import write_report
    from depthprobe.runs import DROP_PROGRESS, REPORT_HTML

    if not opts["out_dir"]:
        # said even with -q (benchmarks time `analyze -q` without --out): a silent run saves nothing
        click.echo("Nothing saved: add --out DIR to keep the table and the report.", err=True)
        return
    out = result.save(opts["out_dir"])
    if not opts["no_report"]:
        write_report([result], out / REPORT_HTML)
    written = set(result.summary["files"]) | ({REPORT_HTML} if not opts["no_report"] else set())
    # the progress file is the drop sweep's own (a fresh sweep replaces an old one)
    clear_owned_outputs(out, opts.get("stale", set()) - written - {DROP_PROGRESS})
    click.echo(f"Results written to {out}/", err=True)


def checked_resume_options(opts: dict, options_json: str, not_recorded: tuple[str, ...],
                           compared: tuple[str, ...] | None = None) -> dict:
    """The options a run records in ``--out``/``options_json``; with ``--resume``, refused in one
    line when they (or just ``compared``) differ from the interrupted run's."""
    import json
    from pathlib import Path

    from depthprobe.errors import DepthprobeError

    recorded = {k: v for k, v in sorted(opts.items()) if k not in not_recorded}
    path = Path(opts["out_dir"]) / options_json
    if not opts["resume"] or not path.is_file():
        return recorded
    try:
        before = json.loads(path.read_text())
    except ValueError:
        return recorded
    keys = compared if compared is not None else sorted(set(recorded) | set(before))
    differ = [k for k in keys if recorded.get(k) != before.get(k)]
    if differ:
        said = ", ".join(f"--{k.replace('_', '-')} {recorded.get(k)!r} (was {before.get(k)!r})" for k in differ)
        raise DepthprobeError(f"--resume with options that differ from the interrupted run in {opts['out_dir']}: "
                              f"{said}; rerun with its options, or without --resume to start over")
    return recorded
