"""Regenerate the committed SmolLM2 numbers and compare them with `reports/smollm2/`.

Runs the analysis of the Makefile's `screenshot` target into a temporary folder (no report,
no screenshot) and checks that every numeric column of `layers.csv` (and the other committed
tables) equals the committed one to 1e-6 (absolute, or relative for large values). Exit 0 when
the numbers are unchanged, 1 otherwise, with the largest differences printed.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/check_committed_report.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "reports" / "smollm2"
COMMAND = ["analyze", "smollm2", "--num-sequences", "4", "--seq-len", "256",
           "--metrics", "angular,variance,grad,lens,drop", "--block-sizes", "2,4,8", "--quiet", "--no-report"]
TABLES = ("layers.csv", "angular_distance.csv", "block_drop.csv", "drop_windows.csv", "proxies.csv")
TOL = 1e-6


def differences(new: Path, old: Path) -> dict[str, float]:
    """Largest |new - old| / max(1, |old|) per table over its numeric columns."""
    worst = {}
    for name in TABLES:
        a, b = pd.read_csv(new / name), pd.read_csv(old / name)
        if list(a.columns) != list(b.columns) or a.shape != b.shape:
            worst[name] = float("inf")
            print(f"{name}: columns or shape differ: {list(a.columns)} {a.shape} vs {list(b.columns)} {b.shape}")
            continue
        num = [c for c in b.columns if pd.api.types.is_numeric_dtype(b[c])]
        x, y = a[num].to_numpy(float), b[num].to_numpy(float)
        same_nan = np.isnan(x) == np.isnan(y)
        rel = np.where(np.isnan(y), 0.0, np.abs(x - y) / np.maximum(1.0, np.abs(y)))
        worst[name] = float(np.nanmax(rel)) if same_nan.all() else float("inf")
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keep", default=None, help="Write the regenerated run here instead of a temp folder.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep or tmp) / "smollm2"
        subprocess.run([sys.executable, "-m", "depthprobe", *COMMAND, "--out", str(out)], check=True, cwd=ROOT)
        worst = differences(out, COMMITTED)
    for name, value in worst.items():
        print(f"{name:<22s} max relative difference {value:.2e}  {'ok' if value <= TOL else 'CHANGED'}")
    return 0 if all(v <= TOL for v in worst.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
