"""Claim 6, real models: SmolLM2-135M (Pre-RMSNorm decoder, 30 blocks) beside MiniLM
(Post-LN BERT encoder) on the same diagnostics, and the pruning curves of every strategy on
SmolLM2. The papers' picture: a Pre-LN model's deep blocks change the stream less and cost
less to drop, and its activation variance grows with depth (Curse of Depth, Mix-LN); a
Post-LN model's stream is renormalized after every sublayer (no growth) and its gradients
shrink toward the input (Mix-LN).

Intervals: the deep/shallow drop-cost ratio with a percentile bootstrap over windows; the
other measures are single values per model. (MiniLM's objective is the cosine drift of the
final hidden state, depthprobe's encoder objective, so its drop costs are on another scale:
only the deep/shallow ratios compare.) Writes reports/real_models/ (report.html: verdict and
tables; models.html: depthprobe's side-by-side report with SmolLM2's pruning curves).

    .venv/bin/python analyses/real_models.py [--num-sequences 8] [--seq-len 128] [--max-removed 0]

The pruning curves (drop, greedy, angular, block-influence, block: loss after removing K
blocks) are measured by analyses/deep_layers_smollm2.py (4 x 256 tokens, up to 10 blocks) and
read from its committed prune_curve.csv; --max-removed K measures them here instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import depthprobe  # noqa: E402
from analyses import _common as C  # noqa: E402
from depthprobe.prune.select import Evaluator, prune_curve  # noqa: E402
from depthprobe.report import write_report  # noqa: E402
from depthprobe.results import AnalysisResult  # noqa: E402
from depthprobe.stats import bootstrap_indices, percentile_interval  # noqa: E402

NAME = "real_models"
MODELS = {"smollm2": "SmolLM2-135M (Pre-LN)", "minilm": "MiniLM (Post-LN)"}


def measure(name: str, label: str, args, out: Path):
    """Analyze one model (and, for a causal LM, its pruning curves); saved under ``out/name``.
    With ``--reuse``, a model already analyzed there is loaded instead."""
    if args.reuse and (out / name / "summary.json").is_file():
        return AnalysisResult.load(out / name)

    model, tok = depthprobe.load_model(name, device="cpu")
    windows = depthprobe.make_windows(tok, num_sequences=args.num_sequences, seq_len=args.seq_len)
    result = depthprobe.analyze(model, windows=windows, metrics="angular,variance,grad,drop", model_name=label,
                                options={"sublayers": False, "block_sizes": [4]}, progress=False)  # fmt: skip
    if result.summary.get("objective") == "lm_loss" and args.max_removed > 0:
        stack = depthprobe.LayerStack.from_model(model)
        result.tables["prune_curve"] = prune_curve(Evaluator(stack, windows.input_ids), result.layers,
                                                   result.angular_distance, args.max_removed, progress=False)  # fmt: skip
    result.save(out / name)
    return result


def drop_ratio_interval(drop_windows: pd.DataFrame, num_layers: int) -> tuple[float, float, float]:
    """mean drop cost of the deep half / the shallow half, and its 95% bootstrap interval
    over windows."""
    wide = drop_windows.pivot(index="window", columns="layer", values="delta_loss").to_numpy()  # (W, L)
    half = num_layers // 2

    def ratio(rows: np.ndarray) -> np.ndarray:
        per_layer = rows.mean(axis=-2)
        return per_layer[..., half:].mean(-1) / per_layer[..., :half].mean(-1)

    samples = ratio(wide[bootstrap_indices(wide.shape[0], 2000, seed=0)])
    lo, hi = percentile_interval(samples)
    return float(ratio(wide)), float(lo), float(hi)


def model_rows(results: dict) -> pd.DataFrame:
    rows = []
    for name, result in results.items():
        row = {"model": MODELS[name], "norm_placement": result.summary.get("norm_placement"),
               "blocks": len(result.layers), **C.profile_measures(result.layers)}  # fmt: skip
        if "drop_windows" in result.tables:
            row["drop_ratio"], row["drop_ratio_lo"], row["drop_ratio_hi"] = drop_ratio_interval(
                result.tables["drop_windows"], len(result.layers))
        rows.append(row)
    return pd.DataFrame(rows)


def verdict_text(table: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    smol, mini = table.iloc[0], table.iloc[1]
    checks = pd.DataFrame([
        ("SmolLM2 deep half changes the stream less", "ang_ratio < 1", f"{smol.ang_ratio:.3g}", smol.ang_ratio < 1),
        ("SmolLM2 deep half costs less to drop", "drop_ratio CI < 1",
         f"{smol.drop_ratio:.3g} [{smol.drop_ratio_lo:.3g}, {smol.drop_ratio_hi:.3g}]", smol.drop_ratio_hi < 1),
        ("SmolLM2 variance grows with depth", "slope ln var > 0", f"{smol.log_var_slope:.3g}", smol.log_var_slope > 0),
        ("MiniLM variance grows less than SmolLM2's", "slope ln var lower", f"{mini.log_var_slope:.3g}",
         mini.log_var_slope < smol.log_var_slope),
    ], columns=["claim", "test", "value", "holds"])  # fmt: skip
    # MiniLM has no LM head, so depthprobe measures no gradients there: that part of the
    # Post-LN picture (gradients shrinking toward the input) is not tested on a real model
    lines = "\n".join(f"- {r.claim}: {r.test}: {r.value} -> {'holds' if r.holds else 'does not hold'}"
                      for r in checks.itertuples())  # fmt: skip
    return f"# Claim 6: real models, SmolLM2 vs MiniLM — {C.verdict_word(list(checks.holds))}\n\n{lines}\n", checks


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--num-sequences", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--max-removed", type=int, default=0,
                    help="pruning curves measured here (0: read them from --prune-curve, the committed ones)")
    ap.add_argument("--prune-curve", default=str(C.ROOT / "reports" / "deep_layers_smollm2" / "prune_curve.csv"),
                    help="SmolLM2 pruning curves of every strategy (analyses/deep_layers_smollm2.py)")
    ap.add_argument("--out", default=str(C.ROOT / "reports" / NAME))
    ap.add_argument("--reuse", action="store_true", help="load models already analyzed in --out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {name: measure(name, label, args, out) for name, label in MODELS.items()}
    table = model_rows(results)
    verdict, checks = verdict_text(table)
    write_report(list(results.values()), out / "models.html", title="SmolLM2 (Pre-LN) beside MiniLM (Post-LN)")
    curve = results["smollm2"].tables.get("prune_curve")
    if curve is None and Path(args.prune_curve).is_file():
        curve = pd.read_csv(args.prune_curve)
    curve = curve if curve is not None else pd.DataFrame()
    C.write_page(out, "Claim 6: real models — SmolLM2 (Pre-LN) beside MiniLM (Post-LN)", [
        ("Verdict", f'<div class="findings">{C.text_tag(verdict)}</div>'),
        ("Depth measures per model", C.table_tag(table)),
        ("SmolLM2 pruning curves, every strategy (loss after removing K blocks)", C.table_tag(curve)),
        ("How", C.text_tag(__doc__ + "\n\nThe full side-by-side diagnostics are in models.html.")),
    ])  # fmt: skip
    C.finish(out, NAME, argv, verdict, {"models": table, "checks": checks, "smollm2_prune_curve": curve})


if __name__ == "__main__":
    main()
