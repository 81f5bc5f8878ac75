"""Drop sweeps with prefix caching: what each block (and sublayer, and run of blocks) is worth.

``drop_delta_loss[l]`` = loss of the model without block l − loss of the full model, on the
same tokens (mean-token LM loss; for encoders the mean cosine drift 1 − cos of the final
hidden state against the full model's, so the full model scores 0).

One full pass per batch stores every block's input x_l. Dropping block l then runs only
blocks l+1..L−1 from x_l through the model's own forward (``LayerStack.start_at``), so a
sweep over L blocks costs about L/2 full passes instead of L. Dropping the attention or MLP
sublayer of block l runs blocks l..L−1 from x_l with that sublayer's output zeroed.
Removing the contiguous run l..l+n−1 (Gromov et al. 2024) runs blocks l+n.. from x_l.

Batches are the outer loop, so memory holds one batch's L+1 states whatever the number of
windows; each finished batch is appended to an optional progress file, and a resumed sweep
skips the batches already there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from depthprobe.errors import DepthprobeError
from depthprobe.model.stack import LayerStack
from depthprobe.probes import metrics as M
from depthprobe.probes.hooks import watch_blocks, zero_output

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZES = (2, 4, 8)


@dataclass
class BatchScorer:
    """Per-window objective of a model run on one batch: LM loss, or drift against the
    full model's final hidden state (encoders)."""

    stack: LayerStack
    input_ids: torch.Tensor
    lm: bool
    reference_final: torch.Tensor | None = None  # encoders: full model's final hidden state

    def from_output(self, out) -> np.ndarray:
        if self.lm:
            return per_window_nll(out.logits, self.input_ids)
        return per_window_drift(out.last_hidden_state, self.reference_final)

    def from_stream(self, hidden: torch.Tensor) -> np.ndarray:
        """Score a residual-stream state as if it were the last block's output."""
        if self.lm:
            return per_window_nll(self.stack.logits(hidden), self.input_ids)
        return per_window_drift(self.stack.final_hidden(hidden), self.reference_final)

    def run(self, start: int, hidden: torch.Tensor, keep: Sequence[int] | None = None) -> np.ndarray:
        """Objective when blocks ``keep`` (default ``start..L-1``) run on ``hidden``."""
        keep = list(range(start, len(self.stack))) if keep is None else list(keep)
        if not keep:
            return self.from_stream(hidden)
        with self.stack.start_at(keep[0], hidden, keep=keep):
            return self.from_output(forward(self.stack, self.input_ids, self.lm))


def forward(stack: LayerStack, input_ids: torch.Tensor, lm: bool):
    return stack.model(input_ids=input_ids, use_cache=False) if lm else stack.model(input_ids=input_ids)


def per_window_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> np.ndarray:
    """Mean next-token NLL of each window, ``(B, T, V), (B, T) -> (B,)``."""
    return M.per_sequence_nll(logits, input_ids).cpu().numpy()


def per_window_drift(hidden: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Mean over tokens of 1 − cos(hidden_t, reference_t), per window ``-> (B,)``."""
    cos = torch.nn.functional.cosine_similarity(hidden.double(), reference.double(), dim=-1).clamp(-1, 1)
    return (1 - cos).mean(1).cpu().numpy()


def capture_states(stack: LayerStack, input_ids: torch.Tensor, lm: bool, keep: Sequence[int] | None = None):
    """One forward pass; returns ``(states, out)`` with ``states[l]`` the input of block l
    (``states[L]`` the last block's output), for the blocks in ``keep`` (default: all)."""
    keep = list(range(len(stack))) if keep is None else list(keep)
    states: dict[int, torch.Tensor] = {}

    def record(layer, x_in, x_out):
        states[layer] = x_in.detach()
        if layer == keep[-1]:
            states[len(stack)] = x_out.detach()

    with stack.keep_blocks(keep), watch_blocks(stack, record, layers=keep):
        out = forward(stack, input_ids, lm)
    return states, out


def drop_sweep(ctx) -> object:
    """``--metrics drop``: single-block, sublayer and contiguous-block drop sweeps.

    Options (``ctx.config.options``): ``block_sizes`` (default 2,4,8 below L; empty to skip),
    ``sublayers`` (default True), ``progress_file`` (append finished batches; resume from it).
    """
    from depthprobe.analysis import SweepOutput

    options = ctx.config.options
    sizes = options.get("block_sizes", DEFAULT_BLOCK_SIZES)
    result = run_drop_sweep(
        ctx.stack,
        ctx.windows.input_ids,
        batch_size=ctx.config.batch_size,
        lm=ctx.objective == "lm_loss",
        sublayers=options.get("sublayers", True),
        block_sizes=[n for n in sizes if 1 < n < len(ctx.stack)],
        progress_file=options.get("progress_file"),
        progress=ctx.progress,
    )
    return SweepOutput(
        columns=result.columns(),
        tables={"drop_windows": result.windows_table(), **({"block_drop": result.block_table()}
                                                          if result.block_sizes else {})},
        summary={"drop_base_loss": float(result.base.mean())},
        seconds=result.seconds,
    )


@dataclass
class DropSweepResult:
    """Per-window objectives of the full model and of every drop, shape ``(N,)`` / ``(L, N)``."""

    base: np.ndarray
    block: np.ndarray
    attn: np.ndarray | None
    mlp: np.ndarray | None
    block_sizes: list[int]
    runs: dict[int, np.ndarray]  # n -> (L-n+1, N) objective with blocks l..l+n-1 removed
    run_angles: dict[int, np.ndarray]  # n -> (L-n+1,) mean angular distance d(x_l, x_{l+n})
    seconds: float

    def columns(self) -> dict[str, np.ndarray]:
        cols = {"drop_delta_loss": (self.block - self.base).mean(1)}
        for name, arr in (("drop_delta_loss_attn", self.attn), ("drop_delta_loss_mlp", self.mlp)):
            if arr is not None:
                cols[name] = (arr - self.base).mean(1)
        return cols

    def windows_table(self) -> pd.DataFrame:
        num_layers, n = self.block.shape
        frame = {
            "layer": np.repeat(np.arange(num_layers), n),
            "window": np.tile(np.arange(n), num_layers),
            "delta_loss": (self.block - self.base).ravel(),
        }
        if self.attn is not None:
            frame["delta_loss_attn"] = (self.attn - self.base).ravel()
        if self.mlp is not None:
            frame["delta_loss_mlp"] = (self.mlp - self.base).ravel()
        return pd.DataFrame(frame)

    def block_table(self) -> pd.DataFrame:
        rows = []
        for n in self.block_sizes:
            for start, (obj, ang) in enumerate(zip(self.runs[n], self.run_angles[n], strict=True)):
                rows.append(
                    {"block_size": n, "start": start, "end": start + n - 1,
                     "delta_loss": float((obj - self.base).mean()), "angular_distance": float(ang)}
                )
        return pd.DataFrame(rows, columns=["block_size", "start", "end", "delta_loss", "angular_distance"])


def run_drop_sweep(
    stack: LayerStack,
    input_ids: torch.Tensor,
    *,
    batch_size: int = 4,
    lm: bool = True,
    sublayers: bool = True,
    block_sizes: Sequence[int] = (),
    progress_file: str | Path | None = None,
    progress: bool = True,
) -> DropSweepResult:
    """Per-window objective of every single-block, sublayer and contiguous-block drop."""
    num_layers, n_windows = len(stack), input_ids.shape[0]
    can_sublayer = sublayers and stack.spec is not None and all(
        stack.sublayer_output_module(0, k) is not None for k in ("attn", "mlp")
    )
    block_sizes = list(block_sizes)
    done = _Progress(progress_file, _fingerprint(stack, input_ids, can_sublayer, block_sizes))
    base = np.full(n_windows, np.nan)
    block = np.full((num_layers, n_windows), np.nan)
    attn = np.full((num_layers, n_windows), np.nan) if can_sublayer else None
    mlp = np.full((num_layers, n_windows), np.nan) if can_sublayer else None
    runs = {n: np.full((num_layers - n + 1, n_windows), np.nan) for n in block_sizes}
    ang_sums = {n: np.zeros(num_layers - n + 1) for n in block_sizes}
    device = next(stack.embed.parameters()).device if stack.embed is not None else stack.device
    steps_per_batch = num_layers * (1 + 2 * can_sublayer) + sum(num_layers - n + 1 for n in block_sizes)
    n_batches = -(-n_windows // batch_size)
    bar = tqdm(total=n_batches * steps_per_batch, desc="drop sweep", disable=not progress, leave=False, delay=0.5)
    t0 = time.perf_counter()
    was_training = stack.model.training
    stack.model.eval()
    try:
        with torch.no_grad():
            for start in range(0, n_windows, batch_size):
                win = slice(start, min(start + batch_size, n_windows))
                saved = done.get(start)
                if saved is not None:
                    base[win], block[:, win] = saved["base"], saved["block"]
                    if can_sublayer:
                        attn[:, win], mlp[:, win] = saved["attn"], saved["mlp"]
                    for n in block_sizes:
                        runs[n][:, win] = saved["runs"][str(n)]
                        ang_sums[n] += np.asarray(saved["ang"][str(n)])
                    bar.update(steps_per_batch)
                    continue
                ids = input_ids[win].to(device)
                states, out = capture_states(stack, ids, lm)
                scorer = BatchScorer(stack, ids, lm, None if lm else out.last_hidden_state)
                base[win] = scorer.from_output(out)
                for layer in range(num_layers):
                    block[layer, win] = scorer.run(layer + 1, states[layer])
                    bar.update()
                    if can_sublayer:
                        for kind, arr in (("attn", attn), ("mlp", mlp)):
                            with zero_output(stack.sublayer_output_module(layer, kind)):
                                arr[layer, win] = scorer.run(layer, states[layer])
                            bar.update()
                batch_angles = {}
                for n in block_sizes:
                    batch_angles[n] = []
                    for first in range(num_layers - n + 1):
                        runs[n][first, win] = scorer.run(first + n, states[first])
                        batch_angles[n].append(M.angular_sum(states[first], states[first + n]))
                        bar.update()
                    ang_sums[n] += np.asarray(batch_angles[n])
                done.append(start, {
                    "base": base[win].tolist(), "block": block[:, win].tolist(),
                    "attn": attn[:, win].tolist() if can_sublayer else None,
                    "mlp": mlp[:, win].tolist() if can_sublayer else None,
                    "runs": {str(n): runs[n][:, win].tolist() for n in block_sizes},
                    "ang": {str(n): batch_angles[n] for n in block_sizes},
                })
                del states, out
    finally:
        bar.close()
        stack.model.train(was_training)
    n_tokens = input_ids.numel()
    return DropSweepResult(
        base=base, block=block, attn=attn, mlp=mlp, block_sizes=block_sizes, runs=runs,
        run_angles={n: ang_sums[n] / n_tokens for n in block_sizes}, seconds=time.perf_counter() - t0,
    )


def _fingerprint(stack: LayerStack, input_ids: torch.Tensor, sublayers: bool, block_sizes) -> str:
    """Identifies a sweep: same model structure, same tokens, same sweep options."""
    h = hashlib.sha256()
    h.update(input_ids.numpy().tobytes())
    h.update(f"{type(stack.model).__name__}:{len(stack)}:{sublayers}:{list(block_sizes)}".encode())
    # weights offloaded by accelerate are meta tensors (no data): use the first resident one
    first = next((p for p in stack.blocks.parameters() if not p.is_meta), None)
    if first is not None:
        h.update(first.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class _Progress:
    """Append-only JSON-lines record of finished batches (one line per batch)."""

    def __init__(self, path: str | Path | None, fingerprint: str):
        self.path = Path(path) if path else None
        self.fingerprint = fingerprint
        self.batches: dict[int, dict] = {}
        if self.path is None or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        if not lines:
            return
        header = json.loads(lines[0])
        if header.get("fingerprint") != fingerprint:
            raise DepthprobeError(
                f"{self.path} belongs to a different sweep (other model, text or options); delete it or drop --resume"
            )
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by an interrupt: recompute that batch
                break
            self.batches[rec["start"]] = rec["data"]

    def get(self, start: int) -> dict | None:
        return self.batches.get(start)

    def append(self, start: int, data: dict) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.is_file() or self.path.stat().st_size == 0
        with self.path.open("a") as f:
            if new:
                f.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")
            f.write(json.dumps({"start": start, "data": data}) + "\n")
            f.flush()
