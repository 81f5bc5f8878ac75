"""`depthprobe report`: re-render saved results; several folders side by side."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_file", type=click.Path(dir_okay=False), default=None,
              help="HTML file to write (default: RUN_DIR/report.html for one run, report.html for several).")
@click.option("--title", default=None, help="Title at the top of the report.")
def command(run_dirs: tuple[str, ...], out_file: str | None, title: str | None) -> None:
    """Render the HTML report of one or more saved runs (analyze, prune, train, compare folders).

    \b
    Examples:
      depthprobe report runs/smol
      depthprobe report runs/smol runs/smol-24 --out smol-vs-pruned.html
      depthprobe report runs/gpt2 runs/gpt2-rms --title "GPT-2: LayerNorm vs RMSNorm"
    """
    from depthprobe.report import write_report

    out = Path(out_file) if out_file else (Path(run_dirs[0]) / "report.html" if len(run_dirs) == 1
                                           else Path("report.html"))
    path = write_report(list(run_dirs), out, title=title)
    click.echo(f"Report written to {path} ({path.stat().st_size / 1024:.0f} KB)")
