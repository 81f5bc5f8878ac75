"""Per-layer linear probes on a language model's residual stream, labelled by a CSV.

``analyze MODEL --metrics probe --labels FILE``. FILE is a CSV with

- ``window``: the 0-based index of a calibration window, in the order the windows are cut;
- ``position`` (optional): a 0-based token index inside that window, for token labels;
- either one ``label`` column (classes: any values) or several attribute columns of 0/1
  (or -1/+1) values (multi-label).

A row's feature at block l is the block's raw output x_{l+1} (``blocks.{l}.resid_post``)
averaged over the window's tokens (window labels) or taken at ``position`` (token labels).
The probes are the image models' (:func:`~depthprobe.probes.linear_probe.probe_layers`):
``probe_accuracy`` (classes) or ``probe_auc`` (attributes) on a held-out split, and
``sparse_probe_units``; the per-target table is ``probe.csv``.
"""

from __future__ import annotations

import numpy as np
import torch

from depthprobe import distributed
from depthprobe.errors import DepthprobeError
from depthprobe.labels import Labels, read_labels
from depthprobe.probes.batch import batches_of
from depthprobe.probes.hooks import evaluating, watch_blocks
from depthprobe.probes.linear_probe import probe_layers
from depthprobe.probes.sweep import SweepContext, SweepOutput

__all__ = ["probe_sweep", "window_features"]


def window_features(ctx: SweepContext, labels: Labels) -> list[np.ndarray]:
    """Per block ``(R, d)``: x_{l+1} averaged over the row's window, or at its position."""
    stack, objective = ctx.stack, ctx.objective
    features = [np.zeros((len(labels.window), 0), np.float32) for _ in range(len(stack))]
    start = 0
    with evaluating(stack.model), torch.no_grad():
        for batch in batches_of(ctx.windows, ctx.batch_size):
            rows = np.flatnonzero((labels.window >= start) & (labels.window < start + batch.size))
            local = torch.as_tensor(labels.window[rows] - start)
            picked: dict[int, np.ndarray] = {}

            def record(layer: int, x_in: torch.Tensor, x_out: torch.Tensor, local=local, rows=rows, picked=picked):
                x = x_out.float()
                if labels.position is None:
                    picked[layer] = x.mean(dim=1)[local.to(x.device)].cpu().numpy()
                else:
                    pos = torch.as_tensor(labels.position[rows], device=x.device)
                    picked[layer] = x[local.to(x.device), pos].cpu().numpy()

            if rows.size:
                with watch_blocks(stack, record):
                    objective.forward(objective.place(batch), head=False)
                for layer, values in picked.items():
                    features[layer] = _put(features[layer], rows, values, len(labels.window))
            start += batch.size
    return features


def _put(block: np.ndarray, rows: np.ndarray, values: np.ndarray, total: int) -> np.ndarray:
    if block.shape[1] == 0:
        block = np.zeros((total, values.shape[1]), np.float32)
    block[rows] = values
    return block


def probe_sweep(ctx: SweepContext) -> SweepOutput:
    """``--metrics probe`` for a language model (or encoder): probes of every block's stream."""
    path = ctx.options.probe.labels_file
    if path is None:
        raise DepthprobeError("--metrics probe on a text model needs --labels FILE "
                              "(a CSV with window[,position] and label columns)")
    if distributed.rank_and_world()[1] > 1:  # each process holds only its share of the windows
        raise DepthprobeError("--metrics probe fits on every window at once: run it without torchrun")
    labels = read_labels(path, ctx.windows.num_sequences, ctx.windows.seq_len)
    columns, table = probe_layers(window_features(ctx, labels), labels.targets, labels.names, labels.multilabel)
    kind = "token" if labels.position is not None else "window"
    summary = {"probe_labels": {"file": str(path), "rows": int(len(labels.window)), "per": kind,
                                "targets": labels.names, "multilabel": labels.multilabel}}
    return SweepOutput(columns=columns, tables={"probe": table}, summary=summary)
