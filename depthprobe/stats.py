"""Statistics over calibration windows: how sure is a drop delta, and which cheap proxy
ranks layers like the real damage does.

Pruning papers rank layers by cheap proxies instead of the loss of actually removing
them. This module measures, on one model and one calibration set, how well each proxy
agrees with the truth, with bootstrap intervals over windows.

**Truth.** ``drop_delta_loss[l]``: mean-token LM loss without block ``l`` minus the full
model's (cosine drift for encoders). From the ``drop_windows`` table (columns ``layer``,
``window``, ``delta_loss`` = that window's mean-token loss delta), the per-layer truth is
the mean over windows (equal to the pooled delta, since windows have equal token counts).

**Proxies** (columns of ``layers.csv``; all oriented "larger = the block matters more"):

============================ ===================================================================
``angular_distance``         mean_t arccos(cos(x_l, x_{l+1})) / pi (Gromov et al. 2024)
``block_influence``          1 - mean_t cos(x_l, x_{l+1}) (ShortGPT, Men et al. 2024)
``grad_norm``                L2 norm of block l's parameter gradients of the LM loss
``attribution``              L1 mass of captum layer conductance of block l's output, share of all blocks
``attribution_gxa``          L1 mass of gradient x activation of block l's output, share
``logit_lens_gain``          ``logit_lens_loss[l-1] - logit_lens_loss[l]``: how much the lens loss falls
                             across block l; undefined for block 0 (no lens at the embeddings), so
                             that proxy is scored on blocks 1..L-1 (``n_layers`` says so)
``spectra_alpha``            minus the block's mean power-law alpha of its weight matrices' ESD
                             (WeightWatcher's fit; ``--metrics spectra``, data-free)
``spectra_alpha_weighted``   minus the block mean of alpha * log10(lambda_max)
``spectra_stable_rank``      minus the block mean of sum(lambda) / lambda_max
``spectra_spectral_norm``    the block mean of lambda_max = sigma_max^2
============================ ===================================================================

**Agreement.** Spearman's rho and Kendall's tau-b (``scipy.stats``) between a proxy and the
truth over the layers where both are finite.

**Bootstrap over windows** (percentile intervals, ``n_boot`` resamples, seeded). Each
resample draws ``N`` windows with replacement from the ``N`` calibration windows, recomputes
the per-layer truth as the mean of the drawn windows' deltas and, for proxies measured per
window (a ``<proxy>`` column in the ``proxy_windows`` table, e.g. ``attribution_windows``),
recomputes the proxy as the sum over the drawn windows; proxies measured only pooled over
all windows (angular distance, block influence, gradient norm, lens) or on no data at all
(weight spectra) are held fixed. The same resamples serve every proxy, so intervals are paired. Resamples where a vector is
constant (rho undefined) are left out of the percentiles.

**Across seeds** (the analyses of trained variants): :func:`paired_difference` (mean of
``a - b`` over seeds, t interval, paired t-test, Cohen's d_z) and :func:`holm` (Holm–Bonferroni
adjusted p-values over the comparisons made).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from depthprobe.config import DEFAULT_BOOTSTRAP_SAMPLES, BootstrapOptions
from depthprobe.errors import DepthprobeError
from depthprobe.results import AnalysisResult

log = logging.getLogger(__name__)

#: proxy column -> plain-language name, in report order
PROXIES: dict[str, str] = {
    "angular_distance": "angular distance",
    "block_influence": "block influence",
    "grad_norm": "gradient norm",
    "attribution": "attribution (layer conductance)",
    "attribution_gxa": "gradient x activation",
    "logit_lens_gain": "logit-lens gain",
    # data-free weight spectra (``--metrics spectra``), block means; see PROXY_SIGNS
    "spectra_alpha": "weight power-law alpha (lower first)",
    "spectra_alpha_weighted": "weight alpha-weighted (lower first)",
    "spectra_stable_rank": "weight stable rank (lower first)",
    "spectra_spectral_norm": "weight spectral norm",
}
#: proxies ranked by their negative (-1): WeightWatcher reads a smaller alpha, alpha-weighted
#: and stable rank as more structure learned, so "lower = the block matters more"
PROXY_SIGNS: dict[str, int] = {"spectra_alpha": -1, "spectra_alpha_weighted": -1, "spectra_stable_rank": -1}

TRUTH = "drop_delta_loss"
#: columns of :func:`proxy_table`
PROXY_COLUMNS = [
    "proxy", "name", "spearman", "spearman_lo", "spearman_hi", "kendall", "kendall_lo", "kendall_hi",
    "n_layers", "n_windows", "resampled", "text",
]  # fmt: skip
DEFAULT_BOOT = DEFAULT_BOOTSTRAP_SAMPLES
DEFAULT_LEVEL = 0.95


# ---------------------------------------------------------------------------- small pieces
def logit_lens_gain(lens_loss: Sequence[float]) -> np.ndarray:
    """``gain[l] = lens[l-1] - lens[l]`` for l >= 1, ``gain[0] = NaN``  ``(L,) -> (L,)``."""
    lens = np.asarray(lens_loss, float)
    return np.concatenate([[np.nan], lens[:-1] - lens[1:]])


def window_matrix(table: pd.DataFrame, value: str) -> np.ndarray:
    """A long ``(layer, window, value)`` table as a ``(L, N)`` matrix, rows by layer, columns
    by window (both sorted). Raises if a (layer, window) pair is missing; a NaN value (a drop
    the model's forward refused) stays NaN."""
    missing = {"layer", "window", value} - set(table.columns)
    if missing:
        raise DepthprobeError(f"per-window table lacks column(s) {', '.join(sorted(missing))}")
    wide = table.pivot_table(index="layer", columns="window", values=value, aggfunc="mean", dropna=False).sort_index()
    if table.groupby(["layer", "window"]).ngroups != wide.size:
        raise DepthprobeError(f"per-window table has missing (layer, window) values of {value}")
    return wide.to_numpy(float)


def bootstrap_indices(n: int, n_boot: int = DEFAULT_BOOT, seed: int = 0) -> np.ndarray:
    """``(n_boot, n)`` window indices drawn with replacement (``numpy`` PCG64, ``seed``)."""
    if n < 1 or n_boot < 1:
        raise DepthprobeError(f"bootstrap needs at least one window and one resample (got {n}, {n_boot})")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def percentile_interval(samples: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over axis 0, ignoring NaN resamples: ``((1-level)/2, (1+level)/2)``."""
    if not 0 < level < 1:
        raise DepthprobeError(f"confidence level must be between 0 and 1 (got {level})")
    tail = 100 * (1 - level) / 2
    with warnings.catch_warnings():  # all-NaN columns (undefined rho everywhere) give NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanpercentile(samples, [tail, 100 - tail], axis=0)
    return lo, hi


# ---------------------------------------------------------------------------- rank correlation
def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho of two vectors (``scipy.stats.spearmanr``); NaN if either is constant."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(sps.spearmanr(x, y).statistic)


def kendall(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two vectors (``scipy.stats.kendalltau``); NaN if either is constant."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(sps.kendalltau(x, y).statistic)


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise Spearman rho of ``(B, L)`` arrays (average ranks for ties): Pearson of ranks."""
    rx = sps.rankdata(np.atleast_2d(x), axis=-1)
    ry = sps.rankdata(np.atleast_2d(y), axis=-1)
    rx = rx - rx.mean(-1, keepdims=True)
    ry = ry - ry.mean(-1, keepdims=True)
    with np.errstate(all="ignore"):
        return (rx * ry).sum(-1) / np.sqrt((rx**2).sum(-1) * (ry**2).sum(-1))


def kendall_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise Kendall tau-b of ``(B, L)`` arrays:
    ``sum_{i<j} s_x s_y / sqrt(#{i<j: s_x != 0} * #{i<j: s_y != 0})`` with
    ``s = sign(v_j - v_i)`` (the same statistic as ``scipy.stats.kendalltau``)."""
    x, y = np.atleast_2d(x), np.atleast_2d(y)
    iu = np.triu_indices(x.shape[-1], k=1)
    sx = np.sign(x[:, :, None] - x[:, None, :])[:, iu[0], iu[1]]
    sy = np.sign(y[:, :, None] - y[:, None, :])[:, iu[0], iu[1]]
    with np.errstate(all="ignore"):
        return (sx * sy).sum(-1) / np.sqrt((sx != 0).sum(-1) * (sy != 0).sum(-1))


# ---------------------------------------------------------------------------- drop intervals
def drop_delta_interval(
    drop_windows: pd.DataFrame, n_boot: int = DEFAULT_BOOT, level: float = DEFAULT_LEVEL, seed: int = 0
) -> pd.DataFrame:
    """Bootstrap interval of each layer's drop delta over windows.

    Args:
        drop_windows: long table with columns ``layer``, ``window``, ``delta_loss``.

    Returns:
        DataFrame ``layer, drop_delta_loss (mean over windows), drop_delta_loss_lo,
        drop_delta_loss_hi`` (percentile interval of the mean over resampled windows).
    """
    deltas = window_matrix(drop_windows, "delta_loss")  # (L, N)
    idx = bootstrap_indices(deltas.shape[1], n_boot, seed)
    boot = deltas[:, idx].mean(-1).T  # (B, L)
    lo, hi = percentile_interval(boot, level)
    return pd.DataFrame(
        {
            "layer": np.sort(drop_windows["layer"].unique()),
            TRUTH: deltas.mean(1),
            f"{TRUTH}_lo": lo,
            f"{TRUTH}_hi": hi,
        }
    )


# ---------------------------------------------------------------------------- proxy table
def proxy_values(layers: pd.DataFrame) -> dict[str, np.ndarray]:
    """The proxies present in a ``layers`` table, ``column -> (L,)`` (``logit_lens_gain``
    derived from ``logit_lens_loss``). Columns that are entirely NaN count as absent."""
    found: dict[str, np.ndarray] = {}
    for name in PROXIES:
        if name == "logit_lens_gain" and "logit_lens_loss" in layers:
            values = logit_lens_gain(layers["logit_lens_loss"])
        elif name in layers:
            values = PROXY_SIGNS.get(name, 1) * layers[name].to_numpy(float)
        else:
            continue
        if np.isfinite(values).any():
            found[name] = values
    return found


def proxy_table(
    layers: pd.DataFrame,
    drop_windows: pd.DataFrame,
    proxy_windows: pd.DataFrame | None = None,
    *,
    proxies: Sequence[str] | None = None,
    n_boot: int = DEFAULT_BOOT,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> pd.DataFrame:
    """Rank agreement of each proxy with the real drop damage, with bootstrap intervals.

    Args:
        layers: per-layer table (``layer`` and proxy columns, see :data:`PROXIES`).
        drop_windows: ``layer, window, delta_loss`` (the truth, per window).
        proxy_windows: optional ``layer, window, <proxy>...`` per-window proxy values;
            proxies found there are recomputed in each resample (sum over drawn windows).
        proxies: which proxy columns (default: every one present in ``layers``).

    Returns:
        One row per proxy: ``proxy, name, spearman, spearman_lo, spearman_hi, kendall,
        kendall_lo, kendall_hi, n_layers, n_windows, resampled ("windows"|"fixed"), text``,
        sorted by Spearman rho, best first. ``text`` is a ready sentence fragment.
    """
    values = proxy_values(layers)
    if proxies is not None:
        unknown = [p for p in proxies if p not in values]
        if unknown:
            raise DepthprobeError(f"proxy column(s) {', '.join(unknown)} not in the table; have {', '.join(values)}")
        values = {p: values[p] for p in proxies}
    deltas = window_matrix(drop_windows, "delta_loss")  # (L, N)
    if deltas.shape[0] != len(layers):
        raise DepthprobeError(f"drop_windows has {deltas.shape[0]} layers but the table has {len(layers)}")
    idx = bootstrap_indices(deltas.shape[1], n_boot, seed)
    rows = [_agreement_row(name, proxy, deltas, idx, proxy_windows, level) for name, proxy in values.items()]
    table = pd.DataFrame(rows, columns=PROXY_COLUMNS)
    return table.sort_values("spearman", ascending=False, na_position="last", kind="stable").reset_index(drop=True)


def _agreement_row(name: str, proxy: np.ndarray, deltas: np.ndarray, idx: np.ndarray,
                   proxy_windows: pd.DataFrame | None, level: float) -> dict:
    """One row of :func:`proxy_table`: the proxy's rank agreement with the mean drop damage
    and its bootstrap intervals over the resampled windows ``idx`` (B, N)."""
    truth = deltas.mean(1)
    truth_boot = deltas[:, idx].mean(-1).T  # (B, L)
    per_window = proxy_windows is not None and name in proxy_windows.columns
    if per_window:
        pw = window_matrix(proxy_windows, name)
        if pw.shape != deltas.shape:
            raise DepthprobeError(f"{name} per-window table is {pw.shape}, drop_windows is {deltas.shape}")
        proxy_boot = pw[:, idx].sum(-1).T
    else:
        proxy_boot = np.broadcast_to(proxy, truth_boot.shape)
    keep = np.isfinite(proxy) & np.isfinite(truth)
    rho, tau = spearman(proxy[keep], truth[keep]), kendall(proxy[keep], truth[keep])
    rho_lo, rho_hi = percentile_interval(spearman_rows(proxy_boot[:, keep], truth_boot[:, keep]), level)
    tau_lo, tau_hi = percentile_interval(kendall_rows(proxy_boot[:, keep], truth_boot[:, keep]), level)
    row = {
        "proxy": name,
        "name": PROXIES[name],
        "spearman": rho,
        "spearman_lo": float(rho_lo),
        "spearman_hi": float(rho_hi),
        "kendall": tau,
        "kendall_lo": float(tau_lo),
        "kendall_hi": float(tau_hi),
        "n_layers": int(keep.sum()),
        "n_windows": deltas.shape[1],
        "resampled": "windows" if per_window else "fixed",
    }
    row["text"] = agreement_text(row)
    return row


def agreement_text(row: dict | pd.Series) -> str:
    """``"angular distance: rho = 0.91 [0.85, 0.95], tau = 0.76 [0.70, 0.82] over 30 layers"``."""
    return (
        f"{row['name']}: rho = {_fmt(row['spearman'])} [{_fmt(row['spearman_lo'])}, {_fmt(row['spearman_hi'])}], "
        f"tau = {_fmt(row['kendall'])} [{_fmt(row['kendall_lo'])}, {_fmt(row['kendall_hi'])}] "
        f"over {int(row['n_layers'])} layers"
    )


def _fmt(value: float) -> str:
    return "nan" if value is None or not np.isfinite(value) else f"{value:.2f}"


def verdict(proxies: pd.DataFrame, level: float = DEFAULT_LEVEL) -> str:
    """One plain-language sentence (or two) from a :func:`proxy_table`.

    Example: ``"On this model, angular distance ranks layers closest to the real damage,
    rho = 0.91 [0.85, 0.95] (95% bootstrap interval over 8 windows, 30 layers)."`` followed,
    when the runner-up's interval reaches the winner's, by a sentence saying the data do
    not separate them; or, when the winner's interval includes 0, that no proxy ranks
    layers reliably.
    """
    ranked = proxies[np.isfinite(proxies["spearman"])].sort_values("spearman", ascending=False, kind="stable")
    if ranked.empty:
        return "No proxy could be compared with the real damage (every rank correlation is undefined)."
    best = ranked.iloc[0]
    interval = f"rho = {_fmt(best['spearman'])} [{_fmt(best['spearman_lo'])}, {_fmt(best['spearman_hi'])}]"
    where = f"{round(100 * level)}% bootstrap interval over {int(best['n_windows'])} windows, {int(best['n_layers'])} layers"
    if not best["spearman_lo"] > 0:
        return (
            f"On this model no proxy ranks layers reliably by their real damage: the best, {best['name']}, "
            f"has {interval} ({where}), an interval that includes 0."
        )
    text = f"On this model, {best['name']} ranks layers closest to the real damage, {interval} ({where})."
    if len(ranked) > 1:
        second = ranked.iloc[1]
        if second["spearman_hi"] >= best["spearman_lo"]:
            text += (
                f" Its interval overlaps that of {second['name']} (rho = {_fmt(second['spearman'])} "
                f"[{_fmt(second['spearman_lo'])}, {_fmt(second['spearman_hi'])}]), so these windows do not "
                "separate the two."
            )
    return text


# ---------------------------------------------------------------------------- pruning curves
def prune_excess(curve: pd.DataFrame, reference: str = "greedy") -> pd.DataFrame:
    """Loss after removing the K layers each strategy picks, against the greedy choice.

    Args:
        curve: ``prune_curve`` table with columns ``strategy, num_removed, loss`` (others
            ignored); ``reference`` rows are the truly least harmful K layers found greedily.

    Returns:
        ``strategy, K, loss, greedy_loss, excess`` (``excess = loss - greedy_loss``), one row
        per non-reference strategy and K that the reference also has, sorted by strategy, K.
    """
    missing = {"strategy", "num_removed", "loss"} - set(curve.columns)
    if missing:
        raise DepthprobeError(f"prune curve lacks column(s) {', '.join(sorted(missing))}")
    ref = curve[curve["strategy"] == reference]
    if ref.empty:
        have = ", ".join(sorted(map(str, curve["strategy"].unique())))
        raise DepthprobeError(f"prune curve has no {reference!r} rows to compare against (strategies: {have})")
    ref = ref.groupby("num_removed", as_index=False)["loss"].min().rename(columns={"loss": "greedy_loss"})
    others = curve.loc[curve["strategy"] != reference, ["strategy", "num_removed", "loss"]]
    table = others.merge(ref, on="num_removed", how="inner").rename(columns={"num_removed": "K"})
    table["excess"] = table["loss"] - table["greedy_loss"]
    table = table[["strategy", "K", "loss", "greedy_loss", "excess"]]
    return table.sort_values(["strategy", "K"], kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------------- wiring
def paired_difference(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> dict:
    """Paired a - b over seeds: mean, t interval, paired t-test p, Cohen's d_z = mean/sd.

    With n pairs: mean d̄, sd s (ddof=1), interval d̄ ± t_{(1+level)/2, n-1} · s/√n.
    """
    d = np.asarray(a, float) - np.asarray(b, float)
    d = d[np.isfinite(d)]
    n = len(d)
    out = {"n": n, "mean_diff": float(d.mean()) if n else math.nan, "ci_low": math.nan, "ci_high": math.nan,
           "p": math.nan, "cohen_dz": math.nan}  # fmt: skip
    if n >= 2:
        sd = float(d.std(ddof=1))
        half = float(sps.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
        out.update(ci_low=out["mean_diff"] - half, ci_high=out["mean_diff"] + half)
        if sd > 0:
            out.update(p=float(sps.ttest_rel(np.asarray(a, float), np.asarray(b, float), nan_policy="omit").pvalue),
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


def with_proxy_statistics(result: AnalysisResult, bootstrap: BootstrapOptions | None = None) -> AnalysisResult:
    """A new result with drop intervals, ``tables["proxies"]`` and the verdict (``result`` is
    not changed).

    Applies when the result has ``drop_delta_loss`` and a ``drop_windows`` table (from the
    drop sweep); otherwise returns ``result`` itself. Adds columns ``drop_delta_loss_lo``/``_hi``
    to ``layers`` and ``summary["bootstrap"]``; when at least one proxy is present,
    ``tables["proxies"]`` (-> ``proxies.csv``) and ``summary["proxy_verdict"]``; when a
    ``prune_curve`` table with a greedy strategy is present, ``tables["prune_excess"]``.
    Per-window proxies come from ``tables["attribution_windows"]`` when present.
    """
    boot = bootstrap or BootstrapOptions()
    if TRUTH not in result.layers or "drop_windows" not in result.tables:
        return result
    layers, tables, summary = result.layers.copy(), dict(result.tables), dict(result.summary)
    ci = drop_delta_interval(tables["drop_windows"], boot.samples, boot.level, boot.seed)
    for col in (f"{TRUTH}_lo", f"{TRUTH}_hi"):
        layers[col] = layers["layer"].map(dict(zip(ci["layer"], ci[col], strict=True)))
    summary["bootstrap"] = {"resamples": boot.samples, "level": boot.level, "seed": boot.seed, "over": "windows"}
    if proxy_values(layers):
        table = proxy_table(layers, tables["drop_windows"], tables.get("attribution_windows"),
                            n_boot=boot.samples, level=boot.level, seed=boot.seed)
        tables["proxies"] = table
        summary["proxy_verdict"] = verdict(table, boot.level)
    curve = tables.get("prune_curve")
    if curve is not None and "strategy" in curve and (curve["strategy"] == "greedy").any():
        tables["prune_excess"] = prune_excess(curve)
    return dataclasses.replace(result, layers=layers, summary=summary, tables=tables)
