"""Warnings attached to statistics that rest on too little data, so no number is shown
without them (summary ``notes``: printed by the CLI, shown in the report's findings)."""

from __future__ import annotations

#: fewer windows than this make bootstrap intervals over windows too narrow to trust (with
#: N windows there are only C(2N-1, N) distinct resamples: 3 for N = 2, 35 for N = 4)
MIN_BOOTSTRAP_WINDOWS = 8
#: attribution's completeness error (|sum of attributions - output change| / |change|) above
#: which its values and ranks are not to be trusted
MAX_CONVERGENCE_DELTA = 0.1


def caveats(summary: dict) -> list[str]:
    """Warnings for the statistics in ``summary`` that rest on too little data."""
    out = []
    windows = summary.get("num_sequences")
    if summary.get("bootstrap") and isinstance(windows, int) and windows < MIN_BOOTSTRAP_WINDOWS:
        out.append(f"warning: the drop intervals and proxy agreements are bootstrapped over only {windows} windows "
                   f"(fewer than {MIN_BOOTSTRAP_WINDOWS}); they understate the uncertainty: use --num-sequences "
                   f"{MIN_BOOTSTRAP_WINDOWS} or more")
    delta = summary.get("attribution_convergence_delta")
    if isinstance(delta, (int, float)) and delta > MAX_CONVERGENCE_DELTA:
        out.append(f"warning: attribution's integration error is large (relative convergence delta {delta:.3g} > "
                   f"{MAX_CONVERGENCE_DELTA}); its values and ranks are unreliable: use more --attribution-steps")
    return out
