"""Linear probes on each block's pooled features (Alain & Bengio 2016; Liu et al. 2015, claim 3).

Features are a block's output averaged over positions (tokens), standardized on the probe's
training split. A held-out split (stratified for classes, seed 0) scores each probe:

- classes: ``probe_accuracy`` of a multinomial logistic regression;
- attributes: ``probe_auc`` per attribute (ROC AUC of one logistic regression each), and
  their mean in ``layers.csv``;
- ``sparse_probe_units``: how many units an L1-regularised probe needs to reach 95% of the
  dense probe's held-out AUC (the fewest nonzero weights over a path of L1 strengths); per
  attribute, or per class one-vs-rest; the mean over targets in ``layers.csv``.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # scikit-learn is imported by the probes that fit (a second's import for every other run)
    from sklearn.linear_model import LogisticRegression

__all__ = ["SPARSE_FRACTION", "probe_layers", "probe_split", "sparse_units"]

SPARSE_FRACTION = 0.95  # of the dense probe's AUC
_L1_PATH = np.logspace(-3, 1, 14)  # inverse L1 strengths, weakest model first


def probe_split(targets: np.ndarray, test_fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out indices: stratified by class for class targets."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(targets))
    stratify = targets if targets.ndim == 1 and np.bincount(targets).min(initial=2) >= 2 else None
    return train_test_split(index, test_size=test_fraction, random_state=seed, stratify=stratify)


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else math.nan


def _fit(x: np.ndarray, y: np.ndarray, **kwargs) -> LogisticRegression:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn 1.8 renames penalty="l1" to l1_ratio=1
        warnings.simplefilter("ignore", UserWarning)
        return LogisticRegression(max_iter=500, **kwargs).fit(x, y)


def sparse_units(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, dense_auc: float) -> float:
    """Fewest nonzero units of an L1 probe with held-out AUC >= SPARSE_FRACTION x ``dense_auc``
    (all units when none along the path reaches it; NaN when the AUC is undefined)."""
    if not math.isfinite(dense_auc) or len(np.unique(ytr)) < 2:
        return math.nan
    best = xtr.shape[1]
    for c in _L1_PATH:
        probe = _fit(xtr, ytr, penalty="l1", solver="liblinear", C=c)
        units = int(np.count_nonzero(probe.coef_))
        if units and _auc(yte, probe.decision_function(xte)) >= SPARSE_FRACTION * dense_auc:
            best = min(best, units)
            break
    return float(best)


def _binary_rows(layer: int, xtr, xte, ytr_all, yte_all, names, sparse: bool) -> list[dict]:
    rows = []
    for k, name in enumerate(names):
        ytr, yte = ytr_all[:, k], yte_all[:, k]
        if len(np.unique(ytr)) < 2:
            rows.append({"layer": layer, "target": name, "probe_auc": math.nan, "sparse_probe_units": math.nan})
            continue
        auc = _auc(yte, _fit(xtr, ytr).decision_function(xte))
        rows.append({"layer": layer, "target": name, "probe_auc": auc,
                     "sparse_probe_units": sparse_units(xtr, ytr, xte, yte, auc) if sparse else math.nan})
    return rows


def probe_layers(features: list[np.ndarray], targets: np.ndarray, names: list[str], multilabel: bool,
                 sparse: bool = True) -> tuple[dict[str, list[float]], pd.DataFrame]:
    """Per block: the layers.csv columns and the per-target table ``probe.csv``.

    Args:
        features: per block ``(N, C)`` pooled features.
        targets: ``(N,)`` class indices or ``(N, A)`` {0, 1} attributes.
        names: class or attribute names.
    """
    from sklearn.preprocessing import StandardScaler

    targets = np.asarray(targets)
    train, test = probe_split(targets if not multilabel else np.zeros(len(targets), int))
    columns: dict[str, list[float]] = {"probe_accuracy" if not multilabel else "probe_auc": [],
                                       "sparse_probe_units": []}
    rows = []
    for layer, x in enumerate(features):
        scaler = StandardScaler().fit(x[train])
        xtr, xte = scaler.transform(x[train]), scaler.transform(x[test])
        if multilabel:
            per = _binary_rows(layer, xtr, xte, targets[train], targets[test], names, sparse)
            columns["probe_auc"].append(float(np.nanmean([r["probe_auc"] for r in per])))
        else:
            dense = _fit(xtr, targets[train])
            accuracy = float((dense.predict(xte) == targets[test]).mean())
            columns["probe_accuracy"].append(accuracy)
            onehot = np.eye(len(names))[targets]
            per = _binary_rows(layer, xtr, xte, onehot[train], onehot[test], names, sparse)
            per = [{**r, "probe_accuracy": accuracy} for r in per]
        units = [r["sparse_probe_units"] for r in per if math.isfinite(r["sparse_probe_units"])]
        columns["sparse_probe_units"].append(float(np.mean(units)) if units else math.nan)
        rows += per
    return columns, pd.DataFrame(rows)
