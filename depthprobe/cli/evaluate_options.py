"""Options and printing shared by `prune`, `eval` and `bench` for judging a pruned model."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import click

from depthprobe.cli import choices
from depthprobe.cli.options import _stack
from depthprobe.cli.parsing import parse_list

#: the journal of a prune's before/after measurements (removed once they are written)
JUDGE_JOURNAL = "judge_progress.jsonl"

heldout_options = _stack(
    click.option("--eval-text-file", type=click.Path(dir_okay=False), default=None,
                 help="Held-out text for scoring (default: the end of the built-in text, never calibration)."),
    click.option("--eval-dataset", default=None, help="Held-out datasets name NAME[:CONFIG[:SPLIT]]."),
    click.option("--heldout/--no-heldout", default=True, show_default=True,
                 help="Score on held-out windows beside the calibration ones."),
    click.option("--heldout-windows", type=int, default=16, show_default=True,
                 help="Held-out windows of --seq-len tokens (the prune curve, repair and healing all use them)."),
)


def heldout_line(summary: dict) -> str | None:
    """One line for every held-out loss of a prune: full -> blocks removed (95% intervals),
    then repaired and healed with the share of the gap they recover; perplexity of the full
    and of the exported model. None when nothing was scored on held-out text."""
    if "heldout_loss_before" in summary:
        lo_b, hi_b = summary["heldout_loss_before_interval"]
        lo_a, hi_a = summary["heldout_loss_after_interval"]
        full, removed = summary["heldout_loss_before"], summary["heldout_loss_after"]
        parts = [f"held-out loss {full:.4f} [{lo_b:.4f}, {hi_b:.4f}] -> blocks removed {removed:.4f} "
                 f"[{lo_a:.4f}, {hi_a:.4f}]"]
        where = f"{summary['heldout_tokens']} tokens, {summary['heldout_source']}"
    elif "heldout_loss_full" in summary:  # --no-heldout with --repair / --heal
        full, removed = summary["heldout_loss_full"], summary["heldout_loss_removed"]
        parts = [f"held-out loss {full:.4f} -> blocks removed {removed:.4f}"]
        where = summary["heldout_source"]
    else:
        return None
    for name, recovered in (("repaired", "repair_recovered"), ("healed", "heal_recovered")):
        value = summary.get(f"heldout_loss_{name}", math.nan)
        if value == value:  # not NaN
            parts.append(f"{name} {value:.4f} ({100 * summary[recovered]:.0f}% of the gap recovered)")
    final = summary.get("heldout_loss_final", removed)
    return (", ".join(parts) + f"   perplexity {math.exp(full):.2f} -> {math.exp(final):.2f}   ({where})")


def print_heldout(summary: dict) -> None:
    line = heldout_line(summary)
    if line is not None:
        click.echo(line)


def quiet_harness(verbose: bool) -> None:
    """lm-eval logs every step at INFO and warns about models passed as objects: errors only."""
    logging.getLogger("lm_eval").setLevel(logging.INFO if verbose else logging.ERROR)


def _bench_size_options(prefix: str, batch_sizes: str, prompt_lens: str, new_tokens: int, repeats: int):
    """The four size options of a bench (``--batch-sizes`` ...; ``--bench-batch-sizes`` ... in prune)."""
    return _stack(
        click.option(f"--{prefix}batch-sizes", default=batch_sizes, show_default=True, help="Comma list of batch sizes."),
        click.option(f"--{prefix}prompt-lens", default=prompt_lens, show_default=True,
                     help="Comma list of prompt lengths."),
        click.option(f"--{prefix}new-tokens", type=int, default=new_tokens, show_default=True,
                     help="Greedy decode steps per prompt."),
        click.option(f"--{prefix}repeats", type=int, default=repeats, show_default=True,
                     help="Timed runs per setting (median)."),
    )


bench_options = _bench_size_options("", "1,4", "128,512", 32, 3)
#: prune measures before and after in one process: a small bench unless asked for more
prune_bench_options = _bench_size_options("bench-", choices.PRUNE_BENCH_BATCH_SIZES, choices.PRUNE_BENCH_PROMPT_LENS,
                                          choices.PRUNE_BENCH_NEW_TOKENS, choices.PRUNE_BENCH_REPEATS)


def bench_config(opts: dict, prefix: str = ""):
    """``BenchConfig`` from the parsed bench size options (``prefix`` ``bench_`` in prune)."""
    from depthprobe.evaluate.bench import BenchConfig

    flag = "--" + prefix.replace("_", "-")
    return BenchConfig(batch_sizes=tuple(parse_list(opts[f"{prefix}batch_sizes"], f"{flag}batch-sizes", int, "1,4")),
                       prompt_lens=tuple(parse_list(opts[f"{prefix}prompt_lens"], f"{flag}prompt-lens", int, "128,512")),
                       new_tokens=opts[f"{prefix}new_tokens"], repeats=opts[f"{prefix}repeats"])


judge_options = _stack(
    click.option("--eval-tasks", default=None,
                 help="lm-eval tasks to score before and after pruning, e.g. depthprobe_cloze or path/to/task.yaml."),
    click.option("--eval-limit", type=int, default=None, help="Documents per task for --eval-tasks (default all)."),
    click.option("--eval-num-fewshot", type=int, default=None, help="Few-shot examples for --eval-tasks."),
    click.option("--bench", "run_bench", is_flag=True,
                 help="Measure prefill/decode tokens/s and peak memory before and after pruning (sizes: --bench-*)."),
    prune_bench_options,
)


class PruneJudge:
    """``prune --eval-tasks / --bench``: score the model before pruning and after, write
    ``eval*.csv`` / ``bench*.csv`` into the prune folder (read by its report).

    Task names and the limit are checked before any model loads (:meth:`check`). Each
    finished measurement is journaled in ``judge_progress.jsonl``, so a resumed prune does not
    measure the original model again.
    """

    def __init__(self, opts: dict, fingerprint: str):
        from depthprobe.journal import Journal

        self.opts = opts
        self.spec = self.manager = None
        path = Path(opts["out_dir"]) / JUDGE_JOURNAL
        if not opts["resume"]:  # a fresh run never mixes in another run's measurements
            path.unlink(missing_ok=True)
        self.journal = Journal(path, fingerprint, what="prune evaluation")
        self.outputs: list = []
        self.bench_rows: list = []

    def check(self) -> None:
        """Tasks resolved and loaded, bench sizes valid: before the model loads."""
        if self.opts["eval_tasks"]:
            from depthprobe.evaluate.harness import check_limit, load_tasks, resolve_tasks, task_manager

            check_limit(self.opts["eval_limit"])
            self.spec = resolve_tasks(self.opts["eval_tasks"])
            self.manager = task_manager(self.spec)
            load_tasks(self.manager, self.spec)
        if self.opts["run_bench"]:
            bench_config(self.opts, "bench_")

    def measure(self, label: str, model, tokenizer) -> None:
        """Evaluate and bench ``model`` as ``label`` (original / pruned), or read them from the journal."""
        import pandas as pd

        if self.spec is not None:
            self.outputs.append(self._journaled(("eval", label), lambda: self._evaluate(label, model, tokenizer)))
        if self.opts["run_bench"]:
            rows = self._journaled(("bench", label), lambda: self._bench(label, model))
            self.bench_rows.append(pd.DataFrame(rows))

    def _journaled(self, key, compute):
        done = self.journal.get(list(key))
        if done is not None:
            return _from_record(key[0], done)
        value = compute()
        self.journal.append(list(key), _to_record(key[0], value))
        return value

    def _evaluate(self, label: str, model, tokenizer):
        from depthprobe.evaluate.harness import evaluate_model

        return evaluate_model(model, tokenizer, self.spec, label=label, limit=self.opts["eval_limit"],
                              num_fewshot=self.opts["eval_num_fewshot"], batch_size=self.opts["batch_size"],
                              manager=self.manager)

    def _bench(self, label: str, model):
        from depthprobe.evaluate.bench import bench, fit_config

        config = fit_config(bench_config(self.opts, "bench_"), model)
        return bench({label: model}, config, progress=not self.opts["quiet"])

    def write(self, out_dir: str) -> None:
        import pandas as pd

        from depthprobe.evaluate.bench import speedups
        from depthprobe.evaluate.harness import retention, write_eval

        if self.outputs:
            write_eval(out_dir, self.outputs)
            click.echo(retention(self.outputs).drop(columns=["reference"])
                       .to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        if self.bench_rows:
            table = pd.concat(self.bench_rows, ignore_index=True)
            table.to_csv(Path(out_dir) / "bench.csv", index=False, float_format="%.6g")
            speed = speedups(table)
            speed.to_csv(Path(out_dir) / "bench_speedup.csv", index=False, float_format="%.6g")
            click.echo(speed.drop(columns=["reference"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        (Path(out_dir) / JUDGE_JOURNAL).unlink(missing_ok=True)  # written: nothing left to resume


def _to_record(kind: str, value):
    """A measurement as JSON: the bench table's rows; an eval output's table and samples."""
    if kind == "bench":
        return value.to_dict(orient="records")
    return {"table": value.table.to_dict(orient="records"),
            "samples": {task: frame.to_dict(orient="records") for task, frame in value.samples.items()}}


def _from_record(kind: str, data):
    import pandas as pd

    if kind == "bench":
        return data
    from depthprobe.evaluate.harness import EvalOutput

    return EvalOutput(table=pd.DataFrame(data["table"]),
                      samples={task: pd.DataFrame(rows) for task, rows in data["samples"].items()})
