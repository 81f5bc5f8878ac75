"""The labels file of ``analyze --metrics probe --labels FILE`` (text models), checked
against the run's windows before any model loads (:mod:`depthprobe.probes.text_probe`
computes the probes).

Columns: ``window`` (0-based calibration window), optional ``position`` (0-based token in
that window), then one ``label`` column of classes or several 0/1 (-1/+1) attribute columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from depthprobe.errors import DepthprobeError

__all__ = ["MIN_ROWS", "Labels", "read_labels"]

MIN_ROWS = 6  # a held-out split of 30% needs a few rows on each side
_KEYS = ("window", "position")


@dataclass(frozen=True)
class Labels:
    """Rows of a labels file: which window (and token) each row reads, and its targets."""

    window: np.ndarray  # (R,) window index
    position: np.ndarray | None  # (R,) token index, None for window labels
    targets: np.ndarray  # (R,) class index or (R, A) {0, 1}
    names: list[str]  # class or attribute names
    multilabel: bool


def read_labels(path: str | Path, num_windows: int, seq_len: int) -> Labels:
    """The labels CSV checked against the run's ``num_windows`` windows of ``seq_len`` tokens."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DepthprobeError(f"--labels {path}: no such file (a CSV with window[,position],label columns)")
    try:
        table = pd.read_csv(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DepthprobeError(f"--labels {path}: not a readable CSV ({exc})") from None
    if "window" not in table.columns:
        raise DepthprobeError(f"--labels {path}: needs a 'window' column (0-based window index); "
                              f"it has {', '.join(map(str, table.columns)) or 'none'}")
    if len(table) < MIN_ROWS:
        raise DepthprobeError(f"--labels {path}: {len(table)} rows; a held-out probe needs at least {MIN_ROWS}")
    window = _index_column(table, "window", num_windows, path, "--num-sequences")
    position = _index_column(table, "position", seq_len, path, "--seq-len") if "position" in table else None
    targets, names, multilabel = _targets(table.drop(columns=[c for c in _KEYS if c in table]), path)
    return Labels(window, position, targets, names, multilabel)


def _index_column(table, name: str, bound: int, path: Path, option: str) -> np.ndarray:
    values = table[name]
    if values.isna().any() or not np.all(np.mod(values.to_numpy(dtype=float), 1) == 0):
        raise DepthprobeError(f"--labels {path}: column {name!r} must hold whole numbers")
    values = values.to_numpy(dtype=np.int64)
    bad = values[(values < 0) | (values >= bound)]
    if bad.size:
        raise DepthprobeError(f"--labels {path}: {name} {int(bad[0])} is outside 0..{bound - 1} "
                              f"(the run has {bound}; raise {option} or fix the file)")
    return values


def _targets(table, path: Path) -> tuple[np.ndarray, list[str], bool]:
    if table.isna().any().any():
        raise DepthprobeError(f"--labels {path}: empty label cells")
    if list(table.columns) == ["label"]:
        names, classes = np.unique(table["label"].astype(str).to_numpy(), return_inverse=True)
        if len(names) < 2:
            raise DepthprobeError(f"--labels {path}: every row has the label {names[0]!r}; a probe needs two classes")
        return classes.astype(np.int64), [str(n) for n in names], False
    if table.shape[1] == 0:
        raise DepthprobeError(f"--labels {path}: no label column ('label', or 0/1 attribute columns)")
    values = table.to_numpy()
    if not np.isin(values, (0, 1, -1)).all():
        raise DepthprobeError(f"--labels {path}: attribute columns must hold 0/1 or -1/+1 "
                              "(or give one 'label' column of classes)")
    return (values > 0).astype(np.int64), [str(c) for c in table.columns], True
