"""Train several norm placements on equal terms and put them side by side.

For seed index ``i`` every variant gets the same initial weights (linears and embeddings;
norms start at one) and the same training windows in the same order (seed ``seed + i``),
and is validated on the same held-out windows. After training, every final model goes
through :func:`depthprobe.analyze` on the held-out windows.

Outputs in ``out_dir``:

- ``<variant>/seed<s>/``: each run's folder (see :mod:`depthprobe.train.trainer`) plus
  ``analysis/`` (``layers.csv``, ``summary.json``, ...).
- ``comparison.csv``: ``variant, seed, final_val_loss, final_val_ppl, diverged, steps_done,
  seconds``, one row per run.
- ``comparison_layers.csv``: the analyses' per-layer tables, with ``variant`` and ``seed``.
- ``comparison_summary.csv``: per variant, mean and sd over seeds of the final validation
  loss and perplexity, and a paired test against ``pre`` across seeds (``scipy.stats``
  ``ttest_rel`` and ``wilcoxon`` on the per-seed losses; diverged seeds are left out).
- ``summary.json``: the same summary plus configs and notes.

The library writes tables only; ``depthprobe compare`` adds ``report.html`` (first analyzed
seed of each variant side by side, with the summary table), and so does
``depthprobe.report.write_report([out_dir], out_dir / "report.html")``.

Example:
    >>> cmp = compare(["pre", "post", "mix"], num_seeds=3, model_config=ModelConfig(**PRESETS["tiny"]),
    ...               train_config=TrainConfig(steps=100), out_dir="runs/cmp")   # doctest: +SKIP
    >>> cmp.summary                                                             # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from depthprobe.analysis import analyze
from depthprobe.config import COMPARE_METRICS, ProbeConfig, RunOptions
from depthprobe.data import Windows
from depthprobe.errors import DepthprobeError
from depthprobe.results import AnalysisResult, write_json
from depthprobe.runs import ANALYSIS_DIR, COMPARISON_CSV, COMPARISON_SUMMARY_CSV, SUMMARY_JSON, seed_dir
from depthprobe.safeio import atomic_to_csv
from depthprobe.train.data import DataConfig, TokenData, load_tokenizer, token_stream
from depthprobe.train.model import PLACEMENT_NAMES, ModelConfig
from depthprobe.train.trainer import TrainConfig, Trainer

log = logging.getLogger(__name__)

DEFAULT_METRICS = COMPARE_METRICS
BASELINE = "pre"


@dataclass
class Comparison:
    """Runs, per-variant summary, per-layer analyses and notes of one comparison."""

    runs: pd.DataFrame  # comparison.csv
    summary: pd.DataFrame  # comparison_summary.csv
    layers: pd.DataFrame  # comparison_layers.csv
    analyses: dict[tuple[str, int], AnalysisResult] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def analyze_run(
    model, data: TokenData, metrics: str | Sequence[str] = DEFAULT_METRICS, progress: bool = False, name: str = ""
) -> AnalysisResult:
    """:func:`depthprobe.analyze` of a trained model on its held-out windows."""
    windows = Windows(data.val, f"{data.source} (held out)")
    return analyze(model, None, ProbeConfig(metrics=metrics, batch_size=8), windows=windows,
                   run=RunOptions(progress=progress, model_name=name))


def compare(
    variants: Sequence[str],
    num_seeds: int,
    model_config: ModelConfig,
    train_config: TrainConfig,
    data_config: DataConfig | None = None,
    out_dir: str | Path | None = None,
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    progress: bool = True,
) -> Comparison:
    """Train every variant for seeds ``train_config.seed + 0 .. num_seeds-1``, analyze, summarize.

    A run that diverges is recorded as such (NaN loss, not analyzed); the others go on.
    """
    variants = list(dict.fromkeys(variants))
    unknown = [v for v in variants if v not in PLACEMENT_NAMES]
    if unknown or not variants:
        raise DepthprobeError(f"unknown variant(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(PLACEMENT_NAMES)}")
    if num_seeds < 1:
        raise DepthprobeError(f"--seeds must be at least 1 (got {num_seeds})")
    data_config = data_config or DataConfig()
    out = Path(out_dir) if out_dir is not None else None
    metrics, notes = tuple(metrics), []
    tokenizer = load_tokenizer(data_config.tokenizer)
    ids, source = token_stream(data_config, tokenizer)

    rows, analyses = [], {}
    for i in range(num_seeds):
        seed = train_config.seed + i
        data = TokenData(ids, train_config.seq_len, seed, data_config.val_windows, source)
        for variant in variants:
            run_dir = seed_dir(out, variant, seed) if out is not None else None
            log.info("training %s seed %d", variant, seed)
            trainer = Trainer(dataclasses.replace(model_config, norm_placement=variant),
                              dataclasses.replace(train_config, seed=seed), data_config, run_dir, progress=progress,
                              data=(data, tokenizer))
            result = trainer.fit()
            rows.append(_run_row(variant, seed, result))
            if result.diverged:
                notes.append(f"{variant} seed {seed}: diverged at step {result.steps_done + 1}; not analyzed")
                continue
            analyses[(variant, seed)] = analyze_run(trainer.model, data, metrics, progress, name=f"{variant}-seed{seed}")
            if run_dir is not None:
                analyses[(variant, seed)].save(run_dir / ANALYSIS_DIR)
    layer_frames = [a.layers.assign(variant=variant, seed=seed) for (variant, seed), a in analyses.items()]
    runs = pd.DataFrame(rows)
    summary = summarize(runs)
    layers = pd.concat(layer_frames, ignore_index=True) if layer_frames else pd.DataFrame()
    if not layers.empty:
        layers = layers[["variant", "seed", *[c for c in layers.columns if c not in ("variant", "seed")]]]
    comparison = Comparison(runs, summary, layers, analyses, notes)
    if out is not None:
        _write(comparison, out, (model_config, train_config, data_config))
    return comparison


def _run_row(variant: str, seed: int, result) -> dict:
    """One row of ``comparison.csv``."""
    return {
        "variant": variant,
        "seed": seed,
        "final_val_loss": result.final_val_loss,
        "final_val_ppl": result.final_val_ppl,
        "diverged": result.diverged,
        "steps_done": result.steps_done,
        "seconds": result.seconds,
    }


def summarize(runs: pd.DataFrame, baseline: str = BASELINE) -> pd.DataFrame:
    """Per variant: mean and sd (ddof=1) over seeds, and a paired test against ``baseline``.

    ``delta_vs_pre`` is the mean over seeds of (variant loss - baseline loss) for the same
    seed; ``ttest_p`` (``scipy.stats.ttest_rel``) and ``wilcoxon_p`` (``scipy.stats.wilcoxon``)
    test that difference; they are NaN with fewer than two complete pairs.
    """
    from scipy import stats

    base = runs[runs.variant == baseline].set_index("seed")["final_val_loss"]
    records = []
    for variant, group in runs.groupby("variant", sort=False):
        ok = group[~group.diverged]
        rec = {
            "variant": variant,
            "num_seeds": len(group),
            "num_diverged": int(group.diverged.sum()),
            "val_loss_mean": ok.final_val_loss.mean(),
            "val_loss_sd": ok.final_val_loss.std(ddof=1) if len(ok) > 1 else math.nan,
            "val_ppl_mean": ok.final_val_ppl.mean(),
            "val_ppl_sd": ok.final_val_ppl.std(ddof=1) if len(ok) > 1 else math.nan,
            "delta_vs_pre": math.nan,
            "ttest_p": math.nan,
            "wilcoxon_p": math.nan,
        }
        if variant != baseline and not base.empty:
            pairs = pd.concat([group.set_index("seed")["final_val_loss"], base], axis=1, join="inner").dropna()
            diff = (pairs.iloc[:, 0] - pairs.iloc[:, 1]).to_numpy()
            if len(diff):
                rec["delta_vs_pre"] = float(diff.mean())
            if len(diff) >= 2 and np.any(diff != 0):
                rec["ttest_p"] = float(stats.ttest_rel(pairs.iloc[:, 0], pairs.iloc[:, 1]).pvalue)
                rec["wilcoxon_p"] = float(stats.wilcoxon(diff).pvalue)
        records.append(rec)
    return pd.DataFrame(records)


def _write(cmp: Comparison, out: Path, configs: tuple[ModelConfig, TrainConfig, DataConfig]) -> None:
    model_config, train_config, data_config = configs
    out.mkdir(parents=True, exist_ok=True)
    atomic_to_csv(cmp.runs, out / COMPARISON_CSV, index=False, float_format="%.8g")
    atomic_to_csv(cmp.summary, out / COMPARISON_SUMMARY_CSV, index=False, float_format="%.6g")
    if not cmp.layers.empty:
        atomic_to_csv(cmp.layers, out / "comparison_layers.csv", index=False, float_format="%.8g")
    write_json(
        out / SUMMARY_JSON,
        {
            "variants": cmp.summary.to_dict(orient="records"),
            "runs": cmp.runs.to_dict(orient="records"),
            "baseline": BASELINE,
            "notes": cmp.notes,
            "config": {
                "model": dataclasses.asdict(model_config),
                "train": dataclasses.asdict(train_config),
                "data": dataclasses.asdict(data_config),
            },
        },
    )
