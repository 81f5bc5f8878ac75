"""`depthprobe bench`: prefill and decode tokens/s and peak memory of a model and its pruned copies."""

from __future__ import annotations

from pathlib import Path

import click

from depthprobe.cli.evaluate_options import bench_config, bench_options
from depthprobe.cli.options import common_options, plain_model_options, setup_logging


@click.command("bench")
@click.argument("models", nargs=-1, required=True)
@bench_options
@plain_model_options
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for bench.csv, bench_speedup.csv and bench.png.")
@common_options
def command(**opts) -> None:
    """Measure prefill and decode tokens/s (greedy, KV cache) and peak memory of MODELS,
    and each one's speedup over the first, beside the ideal (blocks before / after).

    All models stay loaded and are timed in alternation, so compare the ratios of one run.

    \b
    Examples:
      depthprobe bench smollm2 runs/smol-24
      depthprobe bench smollm2 runs/smol-24 --batch-sizes 1,8 --prompt-lens 256 --new-tokens 64 --out runs/bench
      depthprobe bench meta-llama/Llama-2-7b runs/llama-24 --device cuda --dtype bfloat16
    """
    from depthprobe.evaluate.bench import bench_sources, speedups
    from depthprobe.report.eval_figures import plot_bench

    setup_logging(opts["verbose"])
    config = bench_config(opts)
    table = bench_sources(list(opts["models"]), config, progress=not opts["quiet"], dtype=opts["dtype"],
                          device=opts["device"], trust_remote_code=opts["trust_remote_code"])
    fmt = {"float_format": lambda v: f"{v:.4g}", "index": False}
    click.echo(table.drop(columns=["prefill_s", "decode_s"]).to_string(**fmt))
    speed = speedups(table)
    if not speed.empty:
        click.echo(speed.to_string(**fmt))
    if opts["out_dir"]:
        out = Path(opts["out_dir"])
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "bench.csv", index=False, float_format="%.6g")
        speed.to_csv(out / "bench_speedup.csv", index=False, float_format="%.6g")
        plot_bench(table).savefig(out / "bench.png", dpi=96, bbox_inches="tight")
        click.echo(f"Results written to {out}/", err=True)
