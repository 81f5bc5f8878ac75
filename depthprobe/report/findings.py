"""Plain-language findings computed from one run's tables. Pure: data in, sentences out.

Each sentence is made only when the data it speaks about is present, and quotes the numbers
it rests on, so a reader can check it against the table below it in the report.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from depthprobe.results import AnalysisResult

#: a dropped block that costs less than this many nats is called cheap
CHEAP_DROP_NATS = 0.05
#: perplexity budget for "could be removed" statements
PPL_BUDGET = 1.05


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous runs of True as (first, last) index pairs."""
    runs, start = [], None
    for i, flag in enumerate(mask):
        if flag and start is None:
            start = i
        if not flag and start is not None:
            runs.append((start, i - 1))
            start = None
    if start is not None:
        runs.append((start, len(mask) - 1))
    return runs


def _span(first: int, last: int) -> str:
    return f"layer {first}" if first == last else f"layers {first}–{last}"


def _drop_findings(layers: pd.DataFrame, has_ang: bool) -> list[str]:
    """Sentences about the drop sweep: the longest cheap run, how many blocks are cheap."""
    n = len(layers)
    out: list[str] = []
    drop = layers["drop_delta_loss"].to_numpy()
    cheap = drop < CHEAP_DROP_NATS
    runs = sorted(_runs(cheap), key=lambda r: r[1] - r[0], reverse=True)
    if runs and runs[0][1] > runs[0][0]:
        first, last = runs[0]
        seg = slice(first, last + 1)
        detail = f"each cost at most {drop[seg].max():.3f} nats when dropped"
        if has_ang:
            detail = (f"each change the stream by at most {layers['angular_distance'].to_numpy()[seg].max():.3f} "
                      f"and {detail}")
        out.append(f"{_span(first, last).capitalize()} {detail}.")
    out.append(
        f"{int(cheap.sum())} of {n} blocks cost less than {CHEAP_DROP_NATS} nats each when dropped alone; the "
        f"most important is layer {int(np.argmax(drop))} (+{drop.max():.3f} nats without it)."
    )
    if has_ang and n >= 4:
        rho = pd.Series(layers["angular_distance"]).rank().corr(pd.Series(drop).rank())
        out.append(f"Angular distance and drop damage have a Spearman rank correlation of {rho:.2f} over layers.")
    return out


def _curve_findings(result: AnalysisResult) -> list[str]:
    """How many layers fit in the perplexity budget, from a pruning curve."""
    # a prune folder's table is the pruned model's; its curve counts the original's layers
    n = result.summary.get("pruned_from", {}).get("num_layers", len(result.layers))
    out: list[str] = []
    curve = result.tables.get("prune_curve")
    if curve is not None and len(curve) and result.summary.get("objective", "lm_loss") == "lm_loss":
        base = curve[curve["num_removed"] == 0]["loss"].min()
        budget = base + math.log(PPL_BUDGET)
        ok = curve[curve["loss"] <= budget]
        if len(ok):
            best = ok.sort_values(["num_removed", "loss"], ascending=[False, True]).iloc[0]
            k = int(best["num_removed"])
            if k > 0:
                out.append(
                    f"{k} of {n} layers could be removed for at most a {round((PPL_BUDGET - 1) * 100)}% perplexity "
                    f"increase (strategy {best['strategy']}: layers {str(best['removed']).replace(';', ', ')}; "
                    f"loss {base:.3f} → {best['loss']:.3f})."
                )
            else:
                out.append(f"No layer can be removed within a {round((PPL_BUDGET - 1) * 100)}% perplexity budget.")
    return out


def findings(result: AnalysisResult) -> list[str]:
    """Sentences about which layers earn their place, from the columns present."""
    layers = result.layers
    n = len(layers)
    out: list[str] = []
    has_ang = "angular_distance" in layers and layers["angular_distance"].notna().all()
    has_drop = "drop_delta_loss" in layers and layers["drop_delta_loss"].notna().all()

    if has_ang and n >= 4:
        ang = layers["angular_distance"].to_numpy()
        half = n // 2
        out.append(
            f"The deeper half (layers {half}–{n - 1}) changes the residual stream by a mean angular distance of "
            f"{ang[half:].mean():.3f}, against {ang[:half].mean():.3f} in the first half; the smallest change is "
            f"at layer {int(np.argmin(ang))} ({ang.min():.3f}) and the largest at layer {int(np.argmax(ang))} "
            f"({ang.max():.3f})."
        )
    if has_drop:
        out.extend(_drop_findings(layers, has_ang))
    out.extend(_curve_findings(result))
    base_loss = result.summary.get("base_loss")
    if "grad_norm" in layers and layers["grad_norm"].notna().all() and (layers["grad_norm"] > 0).all():
        g = layers["grad_norm"].to_numpy()
        out.append(
            f"Gradient norms span a factor of {g.max() / g.min():.1f} across depth (largest at layer "
            f"{int(np.argmax(g))}, smallest at layer {int(np.argmin(g))})."
        )
    if "max_abs_activation" in layers and "activation_rms" in layers:
        ratio = (layers["max_abs_activation"] / layers["activation_rms"]).to_numpy()
        if np.isfinite(ratio).any() and np.nanmax(ratio) > 100:
            i = int(np.nanargmax(ratio))
            out.append(
                f"Massive activations: at layer {i} the largest |activation| "
                f"({layers['max_abs_activation'].iloc[i]:.3g}) is {ratio[i]:.0f}× the typical RMS."
            )
    if base_loss is not None and "logit_lens_loss" in layers and layers["logit_lens_loss"].notna().all() and n >= 2:
        close = layers["logit_lens_loss"].to_numpy() <= base_loss + 0.5
        first = next(i for i in range(n + 1) if close[i:].all())  # from here on, every layer is close
        if first < n - 1:  # from the last block on is always true: the last state gives the final loss
            out.append(
                f"Read through the final norm and head, the stream is within 0.5 nats of the final loss "
                f"({base_loss:.3f}) from layer {first} on."
            )
    out.extend(f"Note: {note}" for note in result.summary.get("notes", []))
    return out
