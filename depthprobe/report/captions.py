"""Figure captions that describe what the figure of these runs actually shows (which bars are
drawn, which normalization the models use, whether a loss line exists)."""

from __future__ import annotations

from collections.abc import Sequence

from depthprobe.results import AnalysisResult


def _placements(runs: Sequence[AnalysisResult]) -> set[str]:
    return {str(r.summary.get("norm_placement") or "unknown") for r in runs}


def activation_caption(runs: Sequence[AnalysisResult]) -> str:
    placements = _placements(runs)
    text = "Log scale. "
    if placements & {"pre", "parallel"}:
        text += "In a Pre-LN model steady growth with depth is the variance explosion (the Curse of Depth). "
    if "post" in placements:
        text += "A Post-LN model normalizes every block's output, so its scale stays bounded with depth. "
    return text + "A spike in max |activation| marks massive activations."


def lens_caption(runs: Sequence[AnalysisResult]) -> str:
    objectives = {r.summary.get("objective", "lm_loss") for r in runs}
    parts = []
    if "lm_loss" in objectives:
        parts.append("Loss when block l's output goes straight to the final norm and head; the dashed line is the "
                     "full model's loss. Where the curve meets the line, later layers add little.")
    if "cosine_drift" in objectives:
        parts.append("For an encoder (no LM head): cosine drift, mean 1 − cos, between block l's output read "
                     "through the final norm and the model's final state; 0 means the stream already points where "
                     "it ends, and later layers add little.")
    return " ".join(parts)


def drop_caption(runs: Sequence[AnalysisResult]) -> str:
    drawn = {c for r in runs for c in ("drop_delta_loss_attn", "drop_delta_loss_mlp")
             if c in r.layers and r.layers[c].notna().any()}
    what = "Bars: increase of the loss when block l (blue)"
    if drawn == {"drop_delta_loss_attn", "drop_delta_loss_mlp"}:
        what += ", only its attention (yellow) or only its MLP (green)"
    elif drawn:
        what += " or only its " + ("attention (yellow)" if "drop_delta_loss_attn" in drawn else "MLP (yellow)")
    text = what + " is removed; symmetric log scale."
    if any({"drop_delta_loss_lo", "drop_delta_loss_hi"} <= set(r.layers) for r in runs):
        text += " Error bars are 95% bootstrap intervals over windows."
    return text
