"""`depthprobe eval`: lm-evaluation-harness tasks on one or more models, retention vs the first."""

from __future__ import annotations

import click

from depthprobe.cli.choices import CLOZE_TASK as TASK_NAME
from depthprobe.cli.evaluate_options import quiet_harness
from depthprobe.cli.options import common_options, plain_model_options, setup_logging


@click.command("eval")
@click.argument("models", nargs=-1, required=True)
@click.option("--tasks", required=True,
              help=f"Comma list: {TASK_NAME} (built in, offline), path/to/task.yaml, or lm-eval task names.")
@click.option("--limit", type=int, default=None, help="Evaluate only the first N documents of each task.")
@click.option("--num-fewshot", type=int, default=None, help="Few-shot examples per prompt (task default if unset).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Requests per forward pass.")
@plain_model_options
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for eval.csv, eval_samples.csv and eval_retention.csv.")
@common_options
def command(**opts) -> None:
    """Score MODELS on lm-eval-harness tasks; with two or more, each one's retention
    (its score / the first model's, with a paired bootstrap interval over documents).

    MODELS are hub ids, local folders (a pruned model from `depthprobe prune`), .gguf
    files or packaged models (smollm2). Writes tidy eval.csv (model, task, metric, value,
    stderr). Hub task names need their datasets; offline, use the built-in
    depthprobe_cloze task or a local task YAML (dataset_path: json with a local data file).

    \b
    Examples:
      depthprobe eval smollm2 runs/smol-24 --tasks depthprobe_cloze --out runs/eval
      depthprobe eval smollm2 --tasks my_tasks/qa.yaml --limit 100
      depthprobe eval meta-llama/Llama-2-7b runs/llama-24 --tasks hellaswag,piqa --device cuda
    """
    from depthprobe.evaluate.harness import combined, evaluate_sources, retention, write_eval

    setup_logging(opts["verbose"])
    quiet_harness(opts["verbose"])
    outputs = evaluate_sources(list(opts["models"]), opts["tasks"], limit=opts["limit"],
                               num_fewshot=opts["num_fewshot"], batch_size=opts["batch_size"], dtype=opts["dtype"],
                               device=opts["device"], trust_remote_code=opts["trust_remote_code"])
    table, _ = combined(outputs)
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if len(outputs) > 1:
        kept = retention(outputs)
        click.echo("retention vs " + outputs[0].table["model"].iloc[0] + ":")
        click.echo(kept[["model", "task", "metric", "retention", "retention_low", "retention_high"]]
                   .to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if opts["out_dir"]:
        write_eval(opts["out_dir"], outputs)
        click.echo(f"Results written to {opts['out_dir']}/", err=True)
