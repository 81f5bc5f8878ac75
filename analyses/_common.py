"""Shared by the analyses: the campaign's run list and settings, gathering its tables, and the
statistics every claim uses (paired differences with intervals, Holm, effect sizes).

The campaign (``analyses/campaign.py``) writes run folders; :func:`collect` turns them into
tidy tables; the claim scripts read only those tables, so a report can be regenerated from
the committed ``reports/campaign/`` without the (uncommitted) checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

VARIANTS = ("pre", "post", "mix", "peri", "lns", "dyt")
ROOT = Path(__file__).resolve().parent.parent

#: the campaign: deep (16 blocks) and narrow, sized so that 24 runs fit ~40 min on 2 cores
FULL = dict(
    hidden_size=64, num_hidden_layers=16, num_attention_heads=4, intermediate_size=172,
    seq_len=64, batch_size=16, steps=480, lr=2e-3, warmup_steps=48,
    eval_every=24, diag_every=24, ckpt_every=48, max_tokens=4_000_000, val_windows=64,
    metrics=("angular", "variance", "grad", "drop"), seeds=3,
    sweep_variants=("pre", "peri"), sweep_lrs=(4e-3, 1e-2, 2.5e-2), sweep_steps=240,
)  # fmt: skip
#: the same scripts in seconds (make reports-smoke)
SMOKE = dict(
    FULL, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=86,
    seq_len=16, batch_size=4, steps=20, warmup_steps=4, eval_every=4, diag_every=4, ckpt_every=8,
    max_tokens=200_000, val_windows=8, seeds=2, sweep_lrs=(1e-2,), sweep_steps=12,
)  # fmt: skip


@dataclass(frozen=True)
class RunSpec:
    """One training run of the campaign: ``group`` is ``main`` (the grid) or ``sweep``."""

    group: str
    variant: str
    seed: int
    lr: float
    steps: int
    analyze: bool = True

    @property
    def name(self) -> str:
        return f"{self.variant}-seed{self.seed}" + (f"-lr{self.lr:g}" if self.group == "sweep" else "")

    def configs(self, setting: dict):
        """``(ModelConfig, TrainConfig)`` of this run."""
        from depthprobe.train.model import ModelConfig
        from depthprobe.train.trainer import TrainConfig

        shape = {k: setting[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}
        model = ModelConfig(**shape, norm_placement=self.variant, max_position_embeddings=max(256, setting["seq_len"]))
        train = TrainConfig(
            steps=self.steps, batch_size=setting["batch_size"], seq_len=setting["seq_len"], lr=self.lr,
            warmup_steps=setting["warmup_steps"] * self.steps // setting["steps"], eval_every=setting["eval_every"],
            diag_every=setting["diag_every"], ckpt_every=setting["ckpt_every"], seed=self.seed, device="cpu",
            precision="fp32",
        )  # fmt: skip
        return model, train


def campaign_specs(smoke: bool = False) -> tuple[dict, list[RunSpec]]:
    """The setting and its runs, in the order they are started: seeds 0 and 1 of the grid,
    then the learning-rate sweep, then the remaining seeds (useful results come early)."""
    setting = SMOKE if smoke else FULL
    main = [[RunSpec("main", v, s, setting["lr"], setting["steps"]) for v in VARIANTS] for s in range(setting["seeds"])]
    sweep = [
        RunSpec("sweep", v, 0, lr, setting["sweep_steps"], analyze=False)
        for lr in setting["sweep_lrs"]
        for v in setting["sweep_variants"]
    ]
    return setting, [*main[0], *main[1], *sweep, *[s for seed in main[2:] for s in seed]]


def run_dir_of(root: Path, spec: RunSpec) -> Path:
    """``main/<variant>/seed<s>`` (a ``depthprobe compare`` layout) or ``sweep/<variant>-lr<lr>/seed<s>``."""
    if spec.group == "main":
        return root / "main" / spec.variant / f"seed{spec.seed}"
    return root / "sweep" / f"{spec.variant}-lr{spec.lr:g}" / f"seed{spec.seed}"


def _run_row(root: Path, spec: RunSpec) -> dict | None:
    status = run_dir_of(root, spec) / "run.json"
    if not status.is_file():
        return None
    info = json.loads(status.read_text())
    keys = dataclasses.asdict(spec)
    keys.pop("analyze")
    return {
        **keys,
        "final_val_loss": info["final_val_loss"],
        "final_val_ppl": info["final_val_ppl"],
        "diverged": bool(info["diverged"]),
        "finished": bool(info["finished"]),
        "steps_done": info["steps_done"],
        "seconds": info["seconds"],
        "num_parameters": info["num_parameters"],
    }


def collect(root: Path, out: Path, setting: dict, specs: list[RunSpec]) -> None:
    """Gather every finished run's tables into ``out`` (runs, metrics, train_layers, layers)
    and write the main grid as a ``depthprobe compare`` folder with its side-by-side report."""
    out.mkdir(parents=True, exist_ok=True)
    rows, metrics, train_layers, layers = [], [], [], []
    for spec in specs:
        row = _run_row(root, spec)
        if row is None:
            continue
        rows.append(row)
        keys = {"group": spec.group, "variant": spec.variant, "seed": spec.seed, "lr": spec.lr}
        folder = run_dir_of(root, spec)
        metrics.append(pd.read_csv(folder / "metrics.csv").assign(**keys))
        train_layers.append(pd.read_csv(folder / "train_layers.csv").assign(**keys))
        if (folder / "analysis" / "layers.csv").is_file():
            layers.append(pd.read_csv(folder / "analysis" / "layers.csv").assign(**keys))
    runs = pd.DataFrame(rows)
    runs.to_csv(out / "runs.csv", index=False, float_format="%.6g")
    for name, frames in (("metrics", metrics), ("train_layers", train_layers), ("layers", layers)):
        if frames:
            table = pd.concat(frames, ignore_index=True)
            table = table[[*keys, *[c for c in table.columns if c not in keys]]]
            table.to_csv(out / f"{name}.csv", index=False, float_format="%.6g")
    (out / "setting.json").write_text(json.dumps(setting, indent=1, default=list) + "\n")
    main = runs[(runs.group == "main") & runs.finished] if not runs.empty else runs
    if not main.empty and layers:
        _write_comparison(root / "main", out, main, setting)


def _write_comparison(folder: Path, out: Path, main: pd.DataFrame, setting: dict) -> None:
    """``comparison*.csv`` and the side-by-side report of the grid (``depthprobe compare`` layout)."""
    from depthprobe.report import write_report
    from depthprobe.train.compare import summarize

    runs = main[["variant", "seed", "final_val_loss", "final_val_ppl", "diverged", "steps_done", "seconds"]]
    runs.to_csv(folder / "comparison.csv", index=False, float_format="%.8g")
    runs.to_csv(out / "comparison.csv", index=False, float_format="%.8g")
    summary = summarize(runs)
    summary.to_csv(folder / "comparison_summary.csv", index=False, float_format="%.6g")
    summary.to_csv(out / "comparison_summary.csv", index=False, float_format="%.6g")
    title = f"LN placements, {setting['num_hidden_layers']} blocks d={setting['hidden_size']}, side by side"
    write_report([folder], out / "report.html", title=title)


# ----------------------------------------------------------------------------- statistics
def paired_difference(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> dict:
    """Paired a - b over seeds: mean, t interval, paired t-test p, Cohen's d_z = mean/sd.

    With n pairs: mean d̄, sd s (ddof=1), interval d̄ ± t_{(1+level)/2, n-1} · s/√n.
    """
    from scipy import stats

    d = np.asarray(a, float) - np.asarray(b, float)
    d = d[np.isfinite(d)]
    n = len(d)
    out = {"n": n, "mean_diff": float(d.mean()) if n else math.nan, "ci_low": math.nan, "ci_high": math.nan,
           "p": math.nan, "cohen_dz": math.nan}  # fmt: skip
    if n >= 2:
        sd = float(d.std(ddof=1))
        half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
        out.update(ci_low=out["mean_diff"] - half, ci_high=out["mean_diff"] + half)
        if sd > 0:
            out.update(p=float(stats.ttest_rel(np.asarray(a, float), np.asarray(b, float), nan_policy="omit").pvalue),
                       cohen_dz=out["mean_diff"] / sd)  # fmt: skip
    return out


def holm(pvalues: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values: sort p ascending, p_(i) · (m - i), running max, cap 1
    (NaNs stay NaN and do not count in m)."""
    p = np.asarray(pvalues, float)
    ok = np.flatnonzero(np.isfinite(p))
    adjusted = np.full(len(p), np.nan)
    order = ok[np.argsort(p[ok])]
    running = 0.0
    for i, idx in enumerate(order):
        running = max(running, min(1.0, p[idx] * (len(order) - i)))
        adjusted[idx] = running
    return adjusted.tolist()


def paired_table(values: pd.DataFrame, value: str, baseline: str, level: float = 0.95) -> pd.DataFrame:
    """Every variant against ``baseline`` on ``value`` (one row per variant and seed in
    ``values``), paired by seed, with Holm-adjusted p over the comparisons made."""
    wide = values.pivot_table(index="seed", columns="variant", values=value)
    rows = []
    for variant in [v for v in wide.columns if v != baseline]:
        pair = wide[[variant, baseline]].dropna()
        rows.append({"variant": variant, "baseline": baseline, "measure": value,
                     **paired_difference(pair[variant].to_numpy(), pair[baseline].to_numpy(), level)})  # fmt: skip
    table = pd.DataFrame(rows)
    if not table.empty:
        table["p_holm"] = holm(table.p.tolist())
    return table


def plateau(metrics: pd.DataFrame, fraction: float = 0.2) -> dict:
    """Relative change of the validation loss over the last ``fraction`` of the steps:
    |L(end) - L(start of window)| / L(start of window), the evaluated step nearest the start."""
    val = metrics.dropna(subset=["val_loss"])
    if val.empty:
        return {"val_start": math.nan, "val_end": math.nan, "rel_change": math.nan}
    last = int(val.step.max())
    start_step = last - fraction * last
    start = val.iloc[int(np.argmin(np.abs(val.step.to_numpy() - start_step)))]
    end = val.iloc[-1]
    return {"val_start": float(start.val_loss), "val_end": float(end.val_loss),
            "rel_change": abs(float(end.val_loss) - float(start.val_loss)) / float(start.val_loss)}  # fmt: skip
