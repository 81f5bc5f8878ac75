"""What a prune folder's report says first: which blocks went, and the loss before -> after.

Reads ``summary["prune"]`` (the folder's ``prune.json``): calibration loss and perplexity
before and after, and the held-out ones when the prune command measured them.
"""

from __future__ import annotations

import math

from depthprobe.results import AnalysisResult


def prune_sentences(run: AnalysisResult) -> list[str]:
    """Plain sentences about a pruned run (none for other runs)."""
    p = run.summary.get("prune")
    if not p:
        return []
    removed = ", ".join(map(str, p["removed"]))
    out = [f"Removed {p['num_removed']} of {p['num_layers_before']} blocks ({removed}; strategy {p['strategy']}): "
           f"{p['num_layers_before']} → {p['num_layers_after']} blocks."]
    if p.get("objective", "lm_loss") == "lm_loss":
        out.append(f"Calibration loss {p['loss_before']:.4f} → {p['loss_after']:.4f} "
                   f"(perplexity {p['perplexity_before']:.2f} → {p['perplexity_after']:.2f}, "
                   f"{_percent(p['perplexity_before'], p['perplexity_after'])}).")
    else:
        out.append(f"Final-state cosine drift {p['loss_before']:.4g} → {p['loss_after']:.4g}.")
    if _finite(p.get("heldout_loss_before")) and _finite(p.get("heldout_loss_after")):
        out.append(f"Held-out loss {p['heldout_loss_before']:.4f} → {p['heldout_loss_after']:.4f} "
                   f"(perplexity {p['heldout_perplexity_before']:.2f} → {p['heldout_perplexity_after']:.2f}, "
                   f"{_percent(p['heldout_perplexity_before'], p['heldout_perplexity_after'])}) on text the "
                   "calibration windows never saw.")
    else:
        out.append("No held-out loss was measured: the calibration loss above is on the text that chose the blocks.")
    if run.summary.get("pruned_from"):
        out.append("The figures and findings below are the pruned model's own diagnostics on the same windows.")
    return out


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _percent(before: float, after: float) -> str:
    return f"{100 * (after / before - 1):+.1f}%"
