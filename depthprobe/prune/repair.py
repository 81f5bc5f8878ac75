"""Training-free repair of the seam that removing blocks leaves (after ReplaceMe, 2025).

Removing the span of blocks ``s..e-1`` hands block ``e`` the stream ``x_s`` instead of the
``x_e`` it was trained on. Let ``p = s - 1`` be the last kept block before the span and split
its output (a Pre-LN block adds its sublayer outputs to the stream) as::

    x_s = y + m        m = output of p's MLP writer (Llama ``mlp.down_proj``), (N, d)
                       y = everything else: p's input plus its attention output

A linear map ``T`` (d x d) applied to ``m`` alone is exactly fusable into the writer's
weights (``W' = T^T W``, ``b' = T^T b`` for ``y = W h + b``), so the repaired block computes
``y + m T`` with the original architecture. A map of the whole stream ``x_s`` would not be:
``y`` is no linear output of any one weight. So ``T`` is fit to send ``y + m T`` to the full
model's ``x_e``, i.e. ``m T ≈ r = x_e - y``:

- ``linear``: least squares of ``m T ≈ r`` with a ridge toward ``T = I`` (plain removal);
  one map per ridge of a small grid; the validation windows keep the best.
- ``cosine``: start from the best ``linear`` map, then minimise ``1 - cos(y + m T, x_e)`` by
  Adam (the next block reads the stream through a norm, so the direction is what it sees);
  kept only where it validates better than that linear map.

The formulas are in :mod:`depthprobe.prune.repair_math`; this module is the procedure.

Spans are repaired one after another from the shallowest, each fit on the model with the
earlier spans already removed and repaired, each against the full model's stream captured
before any weight changed. The windows are split: the first part fits, the last part
validates; a span whose repair does not lower the validation loss is declined (one line in
the log and in the table), so repair never does worse than plain removal on that split.
A span starting at block 0 has no block before it and is left as it is; so are families whose
sublayer outputs pass through a norm before the stream (Post-LN, Peri-LN), where no linear
map fuses exactly; each fused map is checked against the explicit ``y + m T`` on one window.

Example:
    >>> result = repair_linear(model, [21, 22, 23], windows)        # doctest: +SKIP
    >>> result.table[["start", "stop", "applied", "val_loss_plain", "val_loss_repaired"]]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from depthprobe.data import Windows
from depthprobe.errors import DepthprobeError
from depthprobe.evaluate.heldout import heldout_loss
from depthprobe.model.stack import LayerStack, block_output
from depthprobe.probes.batch import token_batches
from depthprobe.probes.hooks import hooked_all
from depthprobe.probes.objective import objective_for
from depthprobe.prune.repair_math import (  # noqa: F401  (re-exported: the maths of repair)
    _is_conv1d,
    fuse_map,
    removed_spans,
    seam_maps,
    solve_cosine,
    solve_linear,
)
from depthprobe.prune.select import Evaluator

log = logging.getLogger(__name__)

METHODS = ("linear", "cosine")
#: placements whose sublayer outputs are added to the stream as they are (fusable exactly)
_ADDITIVE = ("pre", "parallel", "unknown")
#: last resort when the family table names no writer (module paths inside one block)
_WRITER_NAMES = ("mlp.down_proj", "mlp.fc2", "mlp.c_proj", "mlp.dense_4h_to_h", "fc2", "mlp.fc_out")


def _out_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    return int(module.nf) if _is_conv1d(module) else None


def mlp_writer(stack: LayerStack, layer: int) -> tuple[str, nn.Module] | None:
    """The linear that writes block ``layer``'s MLP output into the stream, as (path, module).

    From the family table: the last stream writer, else the MLP output module when it is a
    linear, else the last linear inside it; a few common names as a fallback.
    """
    block = stack.blocks[layer]
    d = _hidden_size(stack)
    names: list[str] = []
    spec = stack.spec
    if spec is not None and spec.stream is not None:
        names.append(spec.stream.writers[-1])
    if spec is not None and spec.mlp_out:
        names.append(spec.mlp_out)
        inner = block.get_submodule(spec.mlp_out) if _has(block, spec.mlp_out) else None
        if inner is not None:
            linears = [n for n, m in inner.named_modules() if n and _out_features(m) == d]
            names += [f"{spec.mlp_out}.{n}" for n in linears[-1:]]
    names += list(_WRITER_NAMES)
    for name in names:
        module = block.get_submodule(name) if _has(block, name) else None
        if module is not None and _out_features(module) == d:
            return name, module
    return None


def _has(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
        return True
    except AttributeError:
        return False


def _hidden_size(stack: LayerStack) -> int:
    config = getattr(stack.model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise DepthprobeError(f"cannot tell the stream width of {type(stack.model).__name__}: no hidden_size in its config")


class _Stop(Exception):
    """Raised by a hook once every needed state is captured: the rest of the forward is skipped."""


def _run_capturing(stack: LayerStack, ids: torch.Tensor, hooks: dict[nn.Module, str],
                   last: nn.Module) -> dict[str, torch.Tensor]:
    """Forward the windows ``ids`` (placed on the input device) and return each hooked
    module's output (by name), stopping after ``last``."""
    got: dict[str, torch.Tensor] = {}

    def make(name: str):
        def hook(mod, args, output):
            got[name] = block_output(output).detach().float().reshape(-1, block_output(output).shape[-1])
            if mod is last:
                raise _Stop
        return hook

    objective = objective_for(stack)
    with hooked_all((module, make(name)) for module, name in hooks.items()):
        try:
            objective.forward(objective.place(token_batches(ids, len(ids))[0]))
        except _Stop:
            pass
    return got


def _full_targets(stack: LayerStack, windows: torch.Tensor, ends: list[int], first_p: int,
                  batch_size: int) -> tuple[dict[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
    """The full model's stream ``x_e`` (output of block e-1) for each target index ``e``: (N·T, d).

    Also ``(m, y)`` of block ``first_p``, the first span's seam block: before any repair the
    model that skips the spans computes the same prefix, so that pass is saved.
    """
    ends = sorted(set(ends))
    hooks = {stack.blocks[e - 1]: str(e) for e in ends}
    found = mlp_writer(stack, first_p) if first_p >= 0 else None
    if found is not None:
        hooks.update({found[1]: "m", stack.blocks[first_p]: "x"})
    last = stack.blocks[ends[-1] - 1]
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in hooks.values()}
    for start in range(0, windows.shape[0], batch_size):
        got = _run_capturing(stack, windows[start : start + batch_size], hooks, last)
        for name in parts:
            parts[name].append(got[name])
    cat = {name: torch.cat(v) for name, v in parts.items()}
    first = (cat["m"], cat["x"] - cat["m"]) if found is not None else None
    return {e: cat[str(e)] for e in ends}, first


def _seam_states(stack: LayerStack, windows: torch.Tensor, keep: list[int], p: int, writer: nn.Module,
                 batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, y)`` at block ``p`` of the model that runs only ``keep``: writer output and the rest."""
    block = stack.blocks[p]
    ms, ys = [], []
    with stack.keep_blocks(keep):
        for start in range(0, windows.shape[0], batch_size):
            got = _run_capturing(stack, windows[start : start + batch_size], {writer: "m", block: "x"}, block)
            ms.append(got["m"])
            ys.append(got["x"] - got["m"])
    return torch.cat(ms), torch.cat(ys)


@dataclass
class RepairResult:
    """What :func:`repair_linear` did, span by span; ``restore()`` puts the old weights back."""

    method: str
    table: pd.DataFrame
    #: the fused map of each applied span, ``(start, stop) -> T`` (float64, d x d)
    maps: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    _saved: list[tuple[nn.Module, torch.Tensor, torch.Tensor | None]] = field(default_factory=list, repr=False)

    @property
    def applied(self) -> list[tuple[int, int]]:
        """The spans with at least one map kept."""
        rows = self.table[self.table["applied"]]
        return list(dict.fromkeys((int(a), int(b)) for a, b in zip(rows["start"], rows["stop"], strict=True)))

    @torch.no_grad()
    def restore(self) -> None:
        for writer, weight, bias in reversed(self._saved):
            writer.weight.copy_(weight)
            if bias is not None:
                writer.bias.copy_(bias)
        self._saved.clear()


@dataclass(frozen=True)
class RepairConfig:
    method: str = "linear"
    #: λ = ridge · trace(mᵀm)/d pulls T toward I (plain removal); 0 is ordinary least squares.
    #: Each is tried and the validation windows keep the best; without validation the first.
    ridges: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    #: "norm": each token weighted by 1 / ||x_e|| (the next block reads the stream through a
    #: norm, so relative error is what counts and a few huge-norm tokens do not dominate)
    weighting: str = "norm"
    #: last fraction of the windows that validates instead of fitting (0: no check, always fuse)
    val_fraction: float = 0.2
    batch_size: int = 4
    cosine_steps: int = 300
    cosine_lr: float = 1e-4
    #: also fit a map into the first kept block after each span (toward the full model's stream
    #: after that block): a second exactly fusable writer at the same seam
    after: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise DepthprobeError(f"unknown --repair {self.method!r}; choose from {', '.join(METHODS)}")
        if self.weighting not in ("norm", "none"):
            raise DepthprobeError(f"unknown repair weighting {self.weighting!r}; choose norm or none")
        if isinstance(self.ridges, (int, float)):  # one ridge given as a number
            object.__setattr__(self, "ridges", (float(self.ridges),))
        if not self.ridges or min(self.ridges) < 0 or not 0 <= self.val_fraction < 1:
            raise DepthprobeError("--repair-ridge takes ridges >= 0 and the validation fraction is in [0, 1)")


def repair_linear(model: nn.Module, removed: Sequence[int], windows: Windows | torch.Tensor,
                  config: RepairConfig | None = None, *, progress: bool = False, **options) -> RepairResult:
    """Fit and fuse one linear map per removed span (module docs); blocks stay in the model.

    ``removed``: 0-based blocks of ``model`` that will be removed (``remove_blocks`` after).
    ``windows``: token windows to fit on; the last ``val_fraction`` of them validate.
    ``options`` override :class:`RepairConfig` fields (``method="cosine"``, ``ridges=(0,)``;
    ``ridge=x`` is ``ridges=(x,)``).
    Returns the per-span table (start, stop, writer, fit_tokens, val_loss_plain,
    val_loss_repaired, applied, reason); the model's writers hold the accepted maps.
    """
    if "ridge" in options:
        options["ridges"] = (options.pop("ridge"),)
    config = config or RepairConfig(**options)
    stack = LayerStack.from_model(model)
    ids = windows.input_ids if isinstance(windows, Windows) else windows
    n_val = int(round(ids.shape[0] * config.val_fraction))
    if config.val_fraction > 0 and (n_val < 1 or n_val >= ids.shape[0]):
        raise DepthprobeError(f"repair needs at least 2 windows to fit and validate (got {ids.shape[0]}); give more")
    fit_ids, val_ids = ids[: ids.shape[0] - n_val], ids[ids.shape[0] - n_val :]
    d = _hidden_size(stack)
    if fit_ids.numel() < d:
        raise DepthprobeError(f"repair fits a {d}x{d} map and needs at least {d} tokens (got {fit_ids.numel()}); "
                              "give more windows")
    removed = sorted(stack.check_index(i) for i in removed)
    spans = removed_spans(removed)
    keep = [i for i in range(len(stack)) if i not in set(removed)]
    seams = seam_maps(spans, len(stack), config.after)
    targets, first = (_full_targets(stack, ids, [e for *_, e in seams], spans[0][0] - 1, config.batch_size)
                      if _fusable(stack) else ({}, None))
    run = _RepairRun(stack, config, ids, fit_ids.numel(), removed, keep, targets,
                     Evaluator(stack, val_ids, config.batch_size) if n_val else None,
                     RepairResult(config.method, pd.DataFrame()))
    val_loss = run.val.loss(removed) if run.val else float("nan")
    rows = []
    for seam in tqdm(seams, desc=f"repair ({config.method})", disable=not progress, leave=False):
        row, val_loss = _repair_span(run, seam, val_loss, first if seam == seams[0] else None)
        rows.append(row)
    run.result.table = pd.DataFrame(rows)
    return run.result


@dataclass
class _RepairRun:
    """What the repair of every span shares (:func:`_repair_span`)."""

    stack: LayerStack
    config: RepairConfig
    ids: torch.Tensor  # (N, T) every window: the fit ones first, then the validation ones
    n_fit: int  # tokens of the fit windows
    removed: list[int]
    keep: list[int]
    targets: dict[int, torch.Tensor]  # e -> the full model's x_e on every window ({} when not fusable)
    val: Evaluator | None  # the validation windows (None: no check, always fuse)
    result: RepairResult  # collects the fused maps and the saved weights


def _fusable(stack: LayerStack) -> bool:
    return stack.norm_placement in _ADDITIVE


def _decline(start: int, stop: int, reason: str, **extra) -> dict:
    log.info("span %d..%d: repair declined (%s)", start, stop - 1, reason)
    return {"start": start, "stop": stop, "side": extra.get("side", "before"), "writer": extra.get("writer", ""), "fit_tokens": extra.get("fit_tokens", 0),
            "val_loss_plain": extra.get("plain", float("nan")), "val_loss_repaired": extra.get("repaired", float("nan")),
            "applied": False, "map": extra.get("map", ""), "reason": reason}


def _repair_span(run: _RepairRun, seam: tuple[int, int, int, int], val_loss: float,
                 states: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[dict, float]:
    """Fit, fuse, check and validate one map (``seam_maps``); ``states``: its ``(m, y)`` when
    already captured. Returns its table row and the validation loss now."""
    stack, config, ids, n_fit, val, removed = run.stack, run.config, run.ids, run.n_fit, run.val, run.removed
    start, stop, p, end = seam
    side = "before" if p < start else "after"
    if p < 0:
        return _decline(start, stop, "no kept block before it to fuse into", side=side), val_loss
    if not run.targets:
        return _decline(start, stop, f"{stack.norm_placement}-norm blocks: a map cannot be fused exactly",
                        side=side), val_loss
    found = mlp_writer(stack, p)
    if found is None:
        return _decline(start, stop, f"no MLP output linear found in block {p}", side=side), val_loss
    name, writer = found
    m, y = states or _seam_states(stack, ids, run.keep, p, writer, config.batch_size)
    saved = (writer, writer.weight.detach().clone(), None if writer.bias is None else writer.bias.detach().clone())
    info = {"writer": f"{stack.blocks_path}.{p}.{name}", "fit_tokens": n_fit, "plain": val_loss, "side": side}
    fit = (m[:n_fit], y[:n_fit], run.targets[end][:n_fit])
    label, T, repaired = _best_candidate(fit, config, lambda T: _validation_loss(val, removed, writer, T, saved))
    fuse_map(writer, T)
    if not _fused_matches(stack, ids[:1], run.keep, p, writer, m, y, T):
        _restore(saved)
        return _decline(start, stop, "the fused block does not reproduce y + mT (writer not additive)", **info), val_loss
    if val is not None and not repaired < val_loss:
        _restore(saved)
        return _decline(start, stop, f"validation loss {repaired:.4f} >= {val_loss:.4f} without it",
                        repaired=repaired, map=label, **info), val_loss
    run.result._saved.append(saved)
    run.result.maps[(start, stop) if side == "before" else (start, stop, side)] = T
    log.info("span %d..%d: map (%s) fused into %s (validation loss %.4f -> %.4f)", start, stop - 1, label,
             info["writer"], val_loss, repaired)
    row = {
        "start": start, "stop": stop, "side": side, "writer": info["writer"], "fit_tokens": n_fit,
        "val_loss_plain": val_loss, "val_loss_repaired": repaired, "applied": True, "map": label, "reason": ""}
    return row, repaired if val is not None else val_loss


def _validation_loss(val: Evaluator | None, removed, writer: nn.Module, T: torch.Tensor, saved) -> float:
    """Validation loss with ``T`` fused into ``writer`` (the weights are put back after)."""
    if val is None:
        return float("nan")
    fuse_map(writer, T)
    try:
        return val.loss(removed)
    finally:
        _restore(saved)


def _best_candidate(fit, config: RepairConfig, score) -> tuple[str, torch.Tensor, float]:
    """The map with the lowest validation loss ``score(T)`` among least squares at each ridge of
    ``config.ridges`` (only the first without validation) and, for ``cosine``, Adam on the
    cosine objective from the best of them. Returns (label, T, its validation loss)."""
    m, y, target = fit
    weights = 1 / target.norm(dim=-1).clamp_min(1e-6) if config.weighting == "norm" else None
    ridges = config.ridges if config.val_fraction > 0 else config.ridges[:1]
    best = None
    for ridge in ridges:
        T = solve_linear(m, target - y, ridge, weights)
        candidate = (f"linear ridge={ridge:g}", T, score(T))
        best = candidate if best is None or candidate[2] < best[2] else best
    if config.method == "cosine":
        T = solve_cosine(m, y, target, best[1], steps=config.cosine_steps, lr=config.cosine_lr)
        candidate = (f"cosine from {best[0]}", T, score(T))
        best = candidate if config.val_fraction == 0 or candidate[2] < best[2] else best
    return best


@torch.no_grad()
def _restore(saved) -> None:
    writer, weight, bias = saved
    writer.weight.copy_(weight)
    if bias is not None:
        writer.bias.copy_(bias)


def _fused_matches(stack, one, keep, p, writer, m, y, T) -> bool:
    """Block p's new output on one window equals the explicit ``y + m T`` (relative 1e-4)."""
    m_now, y_now = _seam_states(stack, one, keep, p, writer, 1)
    n = y_now.shape[0]
    explicit = (y[:n].double() + m[:n].double() @ T).float()
    fused = y_now + m_now  # block p's output with the fused writer
    return bool(torch.linalg.norm(fused - explicit) <= 1e-4 * torch.linalg.norm(explicit))


def repair_curve(model: nn.Module, removed_by_k: dict[int, list[int]], fit: Windows, heldout: Windows,
                 config: RepairConfig, progress: bool = True,
                 plain: Callable[[Sequence[int]], float] | None = None) -> pd.DataFrame:
    """For each K: held-out loss (``evaluate.heldout.heldout_loss``) with blocks ``removed_by_k[K]``
    removed, plain and repaired.

    Each repair is undone before the next K. ``plain`` gives plain removal's held-out loss when
    already measured. Columns: num_removed, heldout_loss_plain, heldout_loss_repaired,
    repair_spans_applied (``"12-14;25"``, the spans whose map was kept).
    """
    plain = plain or (lambda removed: heldout_loss(model, heldout, removed, config.batch_size))
    rows = []
    for k, removed in tqdm(sorted(removed_by_k.items()), desc="repair curve", disable=not progress, leave=False):
        before = plain(removed)
        result = repair_linear(model, removed, fit, config)
        try:
            repaired = heldout_loss(model, heldout, removed, config.batch_size) if result.maps else before
        finally:
            result.restore()
        rows.append((k, before, repaired, _span_text(result.applied)))
    return pd.DataFrame(rows, columns=["num_removed", "heldout_loss_plain", "heldout_loss_repaired",
                                       "repair_spans_applied"])


def _span_text(spans: Sequence[tuple[int, int]]) -> str:
    return ";".join(f"{a}-{b - 1}" if b - a > 1 else str(a) for a, b in spans)
