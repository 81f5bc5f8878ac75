"""Claim 1, Curse of Depth (Sun et al. 2025, "The Curse of Depth in Large Language Models"):
in a trained Pre-LN model the deeper blocks change the stream less (angular distance) and
cost less to drop than the early ones, and activation variance grows with depth; LayerNorm
Scaling (norm output x 1/sqrt(l+1)) curbs that growth and makes the deep blocks contribute
more. (The paper: Pre-LN variance grows with depth, LNS keeps it lower; in LLaMA-130M, removing
deep layers barely changes performance with Pre-LN but hurts with LNS.)

Reads the campaign's tables (``analyses/campaign.py``); writes reports/curse_of_depth/.

    .venv/bin/python analyses/curse_of_depth.py [--campaign reports/campaign] [--out reports/curse_of_depth]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analyses import _common as C  # noqa: E402

NAME = "curse_of_depth"


def parts(m) -> list:
    zeros = np.zeros(len(C.by_seed(m, "pre", "ang_ratio")))
    return [
        ("Pre-LN deep half changes the stream less", "ln(ang deep/shallow)", -1,
         np.log(C.by_seed(m, "pre", "ang_ratio")), zeros),
        ("Pre-LN deep half costs less to drop", "drop deep - shallow", -1,
         C.by_seed(m, "pre", "drop_deep"), C.by_seed(m, "pre", "drop_shallow")),
        ("Pre-LN variance grows with depth", "slope ln var / block", +1, C.by_seed(m, "pre", "log_var_slope"), zeros),
        ("LNS curbs the variance growth", "slope ln var: lns - pre", -1,
         C.by_seed(m, "lns", "log_var_slope"), C.by_seed(m, "pre", "log_var_slope")),
        ("LNS deep blocks change the stream more", "ang deep: lns - pre", +1,
         C.by_seed(m, "lns", "ang_deep"), C.by_seed(m, "pre", "ang_deep")),
        ("LNS deep blocks cost more to drop", "drop deep: lns - pre", +1,
         C.by_seed(m, "lns", "drop_deep"), C.by_seed(m, "pre", "drop_deep")),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = C.claim_args(NAME, argv)
    out = Path(args.out)
    tables = C.load_campaign(Path(args.campaign))
    m = C.measures(tables)
    table = C.test_parts(parts(m))
    cols = ["variant", "seed", "ang_shallow", "ang_deep", "ang_ratio", "drop_shallow", "drop_deep", "drop_ratio",
            "log_var_slope", "var_last_first"]  # fmt: skip
    per_run = m[cols].sort_values(["variant", "seed"])
    verdict = f"# Claim 1: Curse of Depth — {C.overall_verdict(table)}\n\n{C.parts_text(table)}\n"
    layers = tables["layers"][tables["layers"].group == "main"]
    fig = C.plot_profiles(layers, ["angular_distance", "drop_delta_loss", "activation_variance"], list(C.VARIANTS),
                          log=("activation_variance",))  # fmt: skip
    C.write_page(out, "Claim 1: Curse of Depth (Pre-LN vs LayerNorm Scaling, others beside)", [
        ("Verdict", f'<div class="findings">{C.text_tag(verdict)}</div>'),
        ("Tests (paired by seed, Holm over the parts)", C.table_tag(table)),
        ("Per-layer profiles of the final models (mean over seeds, band = min..max)", C.figure_tag(fig, "profiles")),
        ("Per run", C.table_tag(per_run)),
        ("How", C.text_tag(__doc__)),
    ])  # fmt: skip
    C.finish(out, NAME, argv, verdict, {"tests": table, "per_run": per_run})


if __name__ == "__main__":
    main()
