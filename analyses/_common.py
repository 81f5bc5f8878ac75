"""Shared by the analyses: the campaign's run list and settings, gathering its tables, and the
statistics every claim uses (paired differences with intervals, Holm, effect sizes).

The campaign (``analyses/campaign.py``) writes run folders; :func:`collect` turns them into
tidy tables; the claim scripts read only those tables, so a report can be regenerated from
the committed ``reports/campaign/`` without the (uncommitted) checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from depthprobe.report import write_report  # noqa: E402
from depthprobe.report.html import figure_html, page, table_html  # noqa: E402
from depthprobe.safeio import atomic_write_text  # noqa: E402
from depthprobe.stats import holm, paired_difference  # noqa: E402
from depthprobe.train.compare import summarize  # noqa: E402
from depthprobe.train.model import ModelConfig  # noqa: E402
from depthprobe.train.trainer import TrainConfig  # noqa: E402

VARIANTS = ("pre", "post", "mix", "peri", "lns", "dyt")
ROOT = Path(__file__).resolve().parent.parent

#: the campaign: deep (16 blocks) and narrow; 1200 steps with cosine to 0.01x so that the
#: validation loss flattens (the plateau criterion: at 720 steps 9 of 18 runs still moved
#: 2.0-2.25% over their last 20%), sized to fit ~70 min on 2 quiet cores.
#: The sweep is (learning rate, gradient clip) pairs for pre and peri (clip 0 = none).
FULL = dict(
    hidden_size=64, num_hidden_layers=16, num_attention_heads=4, intermediate_size=172,
    seq_len=64, batch_size=16, steps=1200, lr=2e-3, min_lr_ratio=0.01, warmup_steps=48,
    eval_every=24, diag_every=24, ckpt_every=48, max_tokens=4_000_000, val_windows=64,
    metrics=("angular", "variance", "grad", "drop"), seeds=3,
    dyt_alpha0=0.5, dyt_alpha0_attn=1.0,
    sweep_variants=("pre", "peri"), sweep_steps=160, sweep=((1e-1, 1.0), (3e-2, 0.0), (1e-1, 0.0), (3e-1, 0.0), (1.0, 0.0)),
)  # fmt: skip
#: the same scripts in seconds (make reports-smoke)
SMOKE = dict(
    FULL, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=86,
    seq_len=16, batch_size=4, steps=20, warmup_steps=4, eval_every=4, diag_every=4, ckpt_every=8,
    max_tokens=200_000, val_windows=8, seeds=2, sweep=((1e-2, 0.0),), sweep_steps=12,
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
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping

    @property
    def name(self) -> str:
        return f"{self.variant}-seed{self.seed}" + (f"-lr{self.lr:g}{self.clip_tag}" if self.group == "sweep" else "")

    @property
    def clip_tag(self) -> str:
        """"" at the default clip 1.0, else ``-noclip`` or ``-clip<g>``."""
        return "" if self.grad_clip == 1.0 else "-noclip" if self.grad_clip == 0 else f"-clip{self.grad_clip:g}"

    def configs(self, setting: dict):
        """``(ModelConfig, TrainConfig)`` of this run."""
        shape = {k: setting[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}
        dyt = {k: setting[k] for k in ("dyt_alpha0", "dyt_alpha0_attn") if k in setting}
        model = ModelConfig(**shape, **dyt, norm_placement=self.variant, max_position_embeddings=max(256, setting["seq_len"]))
        train = TrainConfig(
            steps=self.steps, batch_size=setting["batch_size"], seq_len=setting["seq_len"], lr=self.lr,
            warmup_steps=setting["warmup_steps"] * self.steps // setting["steps"], eval_every=setting["eval_every"],
            diag_every=setting["diag_every"], ckpt_every=setting["ckpt_every"], seed=self.seed, device="cpu",
            precision="fp32", min_lr_ratio=setting.get("min_lr_ratio", 0.1), grad_clip=self.grad_clip,
        )  # fmt: skip
        return model, train


def campaign_specs(smoke: bool = False) -> tuple[dict, list[RunSpec]]:
    """The setting and its runs, in the order they are started: seeds 0 and 1 of the grid,
    then the learning-rate sweep, then the remaining seeds (useful results come early)."""
    setting = SMOKE if smoke else FULL
    main = [[RunSpec("main", v, s, setting["lr"], setting["steps"]) for v in VARIANTS] for s in range(setting["seeds"])]
    sweep = [
        RunSpec("sweep", v, 0, lr, setting["sweep_steps"], analyze=False, grad_clip=clip)
        for lr, clip in setting["sweep"]
        for v in setting["sweep_variants"]
    ]
    return setting, [*main[0], *main[1], *sweep, *[s for seed in main[2:] for s in seed]]


def run_dir_of(root: Path, spec: RunSpec) -> Path:
    """``main/<variant>/seed<s>`` (a ``depthprobe compare`` layout) or ``sweep/<variant>-lr<lr>[-noclip]/seed<s>``."""
    if spec.group == "main":
        return root / "main" / spec.variant / f"seed{spec.seed}"
    return root / "sweep" / f"{spec.variant}-lr{spec.lr:g}{spec.clip_tag}" / f"seed{spec.seed}"


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
        keys = {"group": spec.group, "variant": spec.variant, "seed": spec.seed, "lr": spec.lr, "grad_clip": spec.grad_clip}
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
    runs = main[["variant", "seed", "final_val_loss", "final_val_ppl", "diverged", "steps_done", "seconds"]]
    runs.to_csv(folder / "comparison.csv", index=False, float_format="%.8g")
    runs.to_csv(out / "comparison.csv", index=False, float_format="%.8g")
    summary = summarize(runs)
    summary.to_csv(folder / "comparison_summary.csv", index=False, float_format="%.6g")
    summary.to_csv(out / "comparison_summary.csv", index=False, float_format="%.6g")
    title = f"LN placements, {setting['num_hidden_layers']} blocks d={setting['hidden_size']}, side by side"
    write_report([folder], out / "report.html", title=title)


# ----------------------------------------------------------------------------- statistics
# paired differences and Holm's adjustment are depthprobe.stats.paired_difference / holm
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


# ----------------------------------------------------------------------------- per-run measures
def _slope(y: np.ndarray) -> float:
    """Least-squares slope of ``y`` against 0..n-1 (per block)."""
    y = np.asarray(y, float)
    ok = np.isfinite(y)
    if ok.sum() < 2:
        return math.nan
    return float(np.polyfit(np.arange(len(y))[ok], y[ok], 1)[0])


def _cv(x: np.ndarray) -> float:
    """Coefficient of variation sd/mean (ddof=0) across blocks."""
    x = np.asarray(x, float)
    return float(x.std() / x.mean()) if np.isfinite(x).all() and x.mean() > 0 else math.nan


def profile_measures(layers: pd.DataFrame) -> dict:
    """Depth measures of one final model's per-layer analysis (rows sorted by layer).

    shallow / deep = first / second half of the blocks. ``*_ratio`` = mean(deep) / mean(shallow);
    ``log_var_slope`` = slope of ln(activation variance) per block (> 0: variance grows with
    depth); ``log_maxabs_slope`` the same for max |activation|; ``var_last_first`` = variance
    of the last block's output / the first's.
    """
    with np.errstate(divide="ignore", invalid="ignore"):  # stalled runs: zero gradients and drop costs
        return _profile_measures(layers.sort_values("layer"))


def _profile_measures(layers: pd.DataFrame) -> dict:
    half = len(layers) // 2
    shallow, deep = layers.iloc[:half], layers.iloc[half:]
    out = {
        "ang_shallow": shallow.angular_distance.mean(), "ang_deep": deep.angular_distance.mean(),
        "drop_shallow": shallow.drop_delta_loss.mean(), "drop_deep": deep.drop_delta_loss.mean(),
        "log_var_slope": _slope(np.log(layers.activation_variance.to_numpy())),
        "log_maxabs_slope": _slope(np.log(layers.max_abs_activation.to_numpy())),
        "var_last_first": layers.activation_variance.iloc[-1] / layers.activation_variance.iloc[0],
    }  # fmt: skip
    grad = layers["grad_norm"].to_numpy() if "grad_norm" in layers else np.full(len(layers), np.nan)  # encoders: none
    out["final_grad_cv"], out["final_log_grad_slope"] = _cv(grad), _slope(np.log(grad))
    out["ang_ratio"] = out["ang_deep"] / out["ang_shallow"]
    out["drop_ratio"] = out["drop_deep"] / out["drop_shallow"]
    return out


def training_grad_measures(train_layers: pd.DataFrame) -> dict:
    """Per-block gradient norms over training (diagnostic steps after the first): the mean
    over steps of their coefficient of variation across blocks, and of the slope of
    ln(grad norm) per block (< 0: gradients shrink with depth; > 0: shrink toward the input)."""
    steps = train_layers[train_layers.step > 1].groupby("step")
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a stalled run: zero gradients, mean of no values
        cvs = [_cv(g.sort_values("layer").grad_norm.to_numpy()) for _, g in steps]
        slopes = [_slope(np.log(g.sort_values("layer").grad_norm.to_numpy())) for _, g in steps]
        out = {"train_grad_cv": float(np.nanmean(cvs)), "train_log_grad_slope": float(np.nanmean(slopes))}
    dead = sorted(step for step, g in steps if (g.grad_norm == 0).all())
    out["zero_grad_steps"] = len(dead)  # diagnostic steps where every block's gradient is exactly 0
    out["zero_grad_from_step"] = dead[0] if dead else math.nan
    return out


def loss_spikes(metrics: pd.DataFrame, warmup: int, window: int = 20, factor: float = 1.2) -> int:
    """Steps after warmup whose training loss exceeds ``factor`` x the median of the
    previous ``window`` steps' losses."""
    loss = metrics.sort_values("step").train_loss.to_numpy()
    count = 0
    for t in range(max(warmup, window), len(loss)):
        if np.isfinite(loss[t]) and loss[t] > factor * np.median(loss[t - window : t]):
            count += 1
    return count


def load_campaign(folder: Path) -> dict[str, pd.DataFrame]:
    """The campaign's tables (``runs``, ``metrics``, ``train_layers``, ``layers``)."""
    return {name: pd.read_csv(folder / f"{name}.csv") for name in ("runs", "metrics", "train_layers", "layers")
            if (folder / f"{name}.csv").is_file()}  # fmt: skip


def measures(tables: dict[str, pd.DataFrame], group: str = "main") -> pd.DataFrame:
    """One row per (variant, seed) of ``group``: final loss, plateau check, spikes and every
    depth measure above."""
    runs = tables["runs"][tables["runs"].group == group]
    rows = []
    for run in runs.itertuples(index=False):
        key = (tables["metrics"].group == group) & (tables["metrics"].variant == run.variant) & (tables["metrics"].seed == run.seed)
        key &= np.isclose(tables["metrics"].lr, run.lr) & np.isclose(tables["metrics"].grad_clip, run.grad_clip)
        metrics = tables["metrics"][key]
        row = {"variant": run.variant, "seed": run.seed, "lr": run.lr, "grad_clip": run.grad_clip,
               "final_val_loss": run.final_val_loss,
               "final_val_ppl": run.final_val_ppl, "diverged": run.diverged, **plateau(metrics)}  # fmt: skip
        row["spikes"] = loss_spikes(metrics, warmup=int(0.1 * run.steps))
        for name, fn in (("train_layers", training_grad_measures), ("layers", profile_measures)):
            table = tables.get(name)
            if table is None:
                continue
            sel = table[(table.group == group) & (table.variant == run.variant) & (table.seed == run.seed)
                        & np.isclose(table.lr, run.lr) & np.isclose(table.grad_clip, run.grad_clip)]  # fmt: skip
            if not sel.empty:
                row.update(fn(sel))
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- report pages
# pages are depthprobe.report's: one self-contained file, its CSS, figures and tables


def figure_tag(fig, alt: str) -> str:
    """A matplotlib figure as an inline PNG ``<figure>`` (the page stays one offline file)."""
    return figure_html(fig, alt, alt)


def write_page(out: Path, title: str, sections: list[tuple[str, str]]) -> None:
    """``out/report.html``: a title and (heading, html) sections; headings are escaped, the
    bodies are built from escaped text, :func:`table_tag` and :func:`figure_tag`."""
    body = f"<h1>{html.escape(title)}</h1>" + "".join(f"<h2>{html.escape(h)}</h2>{b}" for h, b in sections)
    atomic_write_text(out / "report.html", page(title, body))


def table_tag(frame: pd.DataFrame) -> str:
    return table_html(frame, digits=4)


def text_tag(text: str) -> str:
    return "".join(f"<p>{html.escape(p)}</p>" for p in text.strip().split("\n\n"))


def plot_profiles(layers: pd.DataFrame, columns: list[str], variants: list[str], log: tuple[str, ...] = ()):
    """Per-layer mean over seeds (line) and min..max over seeds (band) of each column, one
    panel per column, one color per variant."""
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.3), squeeze=False)
    for ax, column in zip(axes[0], columns, strict=True):
        for variant in variants:
            sel = layers[layers.variant == variant].groupby("layer")[column]
            mean, lo, hi = sel.mean(), sel.min(), sel.max()
            ax.plot(mean.index, mean.to_numpy(), marker=".", label=variant)
            ax.fill_between(mean.index, lo.to_numpy(), hi.to_numpy(), alpha=0.15)
        ax.set_title(column, fontsize=10)
        ax.set_xlabel("layer")
        if column in log:
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def claim_args(name: str, argv: list[str] | None):
    """``--campaign`` (the gathered tables) and ``--out`` (this claim's folder)."""
    ap = argparse.ArgumentParser(description=f"analyses/{name}.py: see the module docstring")
    ap.add_argument("--campaign", default=str(ROOT / "reports" / "campaign"))
    ap.add_argument("--out", default=str(ROOT / "reports" / name))
    args = ap.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return args


def finish(out: Path, name: str, argv: list[str] | None, verdict: str, tables: dict[str, pd.DataFrame]) -> None:
    """Write the claim's CSVs, ``verdict.md`` and ``command.txt``; print the verdict."""
    for table_name, frame in tables.items():
        frame.to_csv(out / f"{table_name}.csv", index=False, float_format="%.6g")
    (out / "verdict.md").write_text(verdict.strip() + "\n")
    args = argv if argv is not None else sys.argv[1:]
    (out / "command.txt").write_text(" ".join([".venv/bin/python", f"analyses/{name}.py", *args]) + "\n")
    print(verdict)


def verdict_word(holds: list[bool]) -> str:
    """reproduced (every part holds), partly (some), not reproduced (none)."""
    if all(holds):
        return "reproduced"
    return "partly reproduced" if any(holds) else "not reproduced"


def fmt_ci(row) -> str:
    """``mean [lo, hi]`` of a paired-difference row."""
    return f"{row['mean_diff']:+.4g} [{row['ci_low']:+.4g}, {row['ci_high']:+.4g}]"


def test_parts(parts: list[tuple[str, str, int, np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """Each part ``(claim, measure, sign, a, b)`` says mean(a - b) has the sign ``sign``
    (paired by seed; b = zeros for a one-sample test). One row per part: the paired
    difference, its interval, p, Holm-adjusted p over the parts, Cohen's d_z, how many seeds
    go the claimed way, and ``holds`` = the claimed sign with Holm p < 0.05."""
    rows = []
    for claim, measure, sign, a, b in parts:
        diff = np.asarray(a, float) - np.asarray(b, float)
        rows.append({"claim": claim, "measure": measure, "claimed_sign": "+" if sign > 0 else "-",
                     **paired_difference(a, b), "seeds_in_direction": int(np.sum(np.sign(diff) == sign))})  # fmt: skip
    table = pd.DataFrame(rows)
    table["p_holm"] = holm(table.p.tolist())
    table["direction_ok"] = np.sign(table.mean_diff) == table.claimed_sign.map({"+": 1, "-": -1})
    table["holds"] = table.direction_ok & (table.p_holm < 0.05)
    return table


def overall_verdict(table: pd.DataFrame) -> str:
    """reproduced: every part holds; partly: some hold, or every mean goes the claimed way
    without significance; not reproduced: otherwise."""
    if table.holds.all():
        return "reproduced"
    if table.holds.any():
        return "partly reproduced"
    if table.direction_ok.all():
        return "partly reproduced (every direction as claimed, none significant after Holm)"
    return "not reproduced"


def parts_text(table: pd.DataFrame) -> str:
    """One line per part for verdict.md."""
    lines = []
    for row in table.to_dict(orient="records"):
        lines.append(f"- {row['claim']}: {row['measure']} difference {fmt_ci(row)} (95% t interval, n={row['n']}), "
                     f"p={row['p']:.3g}, Holm p={row['p_holm']:.3g}, d_z={row['cohen_dz']:.3g}, "
                     f"{row['seeds_in_direction']}/{row['n']} seeds in the claimed direction -> "
                     f"{'holds' if row['holds'] else 'does not hold'}")  # fmt: skip
    return "\n".join(lines)


def by_seed(m: pd.DataFrame, variant: str, column: str) -> np.ndarray:
    """``column`` of ``variant`` ordered by seed (NaN where a seed is missing)."""
    seeds = sorted(m.seed.unique())
    sel = m[m.variant == variant].set_index("seed")[column]
    return np.array([sel.get(s, np.nan) for s in seeds], float)
