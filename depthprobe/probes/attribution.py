"""Per-block attribution with captum: how much of the model's prediction flows through each block.

Two columns, both oriented "larger = the block matters more" and normalised to sum 1 over
blocks:

``attribution`` (layer conductance, Dhamdhere et al. 2018, captum ``LayerConductance``)
    The target is ``f(e)``, the summed log-probability of the actual next tokens of a
    window (``sum_t log p(ids[t+1] | ids[:t+1])``) as a function of the input embeddings
    ``e`` (passed through ``inputs_embeds``). Along the straight path
    ``e(alpha) = e' + alpha (e - e')`` from the baseline ``e'`` (the average token
    embedding at every position, see :func:`mean_embedding`) to the real embeddings,
    the conductance of output coordinate ``i`` of block ``l`` (``y = x_{l+1}``, the block's
    raw output: the residual stream after it) is::

        C_l,i = sum_{k=0}^{n-1} w_i,k * (y_i(alpha_{k+1}) - y_i(alpha_k)),
        alpha_k = k / n  (captum's ``riemann_trapezoid`` alphas, n = attribution_steps),
        w_i,k = (dF/dy_i(alpha_k) + dF/dy_i(alpha_{k+1})) / 2

    (the trapezoid rule, error ~ 1/n^2; ``rule="left"`` takes ``w = dF/dy_i(alpha_k)``,
    which is exactly captum's ``LayerConductance`` with error ~ 1/n; both are tested).

    By completeness, ``sum_i C_l,i = f(e) - f(e')`` up to the integration error (captum's
    "convergence delta") for *every* block, because each block's output is a cut through
    the network. The signed sum therefore cannot rank blocks; depthprobe ranks them by the
    L1 mass ``A_l = sum over windows, tokens and dims of |C_l,i|`` and reports
    ``attribution_l = A_l / sum_k A_k``.

``attribution_gxa`` (gradient x activation, captum ``LayerGradientXActivation``)
    ``G_l = sum |dF/dy_i * y_i|`` at the real input (alpha = 1), normalised the same way.
    It is the last point of the conductance path, so it costs nothing extra here.

Why conductance rather than ``LayerIntegratedGradients``: LIG patches one layer per run, so
L blocks cost ``L * n`` forward+backward passes; conductance takes the gradients with
respect to *all* block outputs from the same path (captum's
``compute_layer_gradients_and_eval`` with a list of layers, no patching), so all blocks
cost ``n + 1`` passes. With ``rule="left"`` the result equals captum's
``LayerConductance`` run block by block (tested). Encoders (no LM head) use ``f = sum_t cos(h_t(e), h_t^ref)``, the agreement of
the final hidden state with the full model's, the same stand-in as drop and lens.

Memory: one path point of ``attribution_batch_size`` windows (default ``--batch-size``) per
forward pass; the running conductance is ``L x (B, T, d)`` floats.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from depthprobe import distributed
from depthprobe.errors import DepthprobeError
from depthprobe.model.stack import LayerStack
from depthprobe.probes.batch import Batch, token_batches
from depthprobe.probes.hooks import evaluating
from depthprobe.probes.objective import Objective
from depthprobe.probes.sweep import DEFAULT_ATTRIBUTION_STEPS, AttributionOptions, SweepContext, SweepOutput

log = logging.getLogger(__name__)

DEFAULT_STEPS = DEFAULT_ATTRIBUTION_STEPS
#: kept for existing callers: the attribution sweep's options
AttributionConfig = AttributionOptions


@dataclass
class BlockAttribution:
    """Raw per-window results of :func:`block_conductance`.

    ``conductance`` and ``gxa`` are the L1 masses ``(L, N)``; ``signed`` the signed sums of
    the conductance ``(L, N)``; ``target`` and ``baseline_target`` are ``f(e)``, ``f(e')``
    per window ``(N,)``. ``signed[l] - (target - baseline_target)`` is captum's
    convergence delta for block ``l``.
    """

    conductance: np.ndarray
    gxa: np.ndarray
    signed: np.ndarray
    target: np.ndarray
    baseline_target: np.ndarray

    @property
    def convergence_delta(self) -> np.ndarray:
        return self.signed - (self.target - self.baseline_target)[None, :]


def lm_target(model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``f(inputs_embeds (B,T,d), input_ids (B,T)) -> (B,)``: summed log-probability of the
    actual next tokens, ``sum_{t<T-1} log softmax(logits_t)[ids_{t+1}]`` (:meth:`Objective.target`)."""
    return Objective(LayerStack.from_model(model)).target


@contextlib.contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients (attribution needs gradients w.r.t. activations only);
    eval mode (no dropout). Both restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with evaluating(model):
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def block_conductance(
    stack: LayerStack,
    input_ids: torch.Tensor,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 4,
    progress: bool = False,
    rule: str = "trapezoid",
) -> BlockAttribution:
    """Conductance and gradient x activation of every block output, per window.

    Args:
        stack: the model's :class:`LayerStack`.
        input_ids: ``(N, T)`` windows.
        steps: ``n``: the path has ``n + 1`` points ``alpha_k = k / n``; cost ``n + 1``
            forward+backward passes per batch, all blocks at once.
        batch_size: windows per forward pass.
        rule: ``"trapezoid"`` weighs each step's output change by the mean of the gradients
            at its two ends (error ~ 1/steps^2); ``"left"`` by the gradient at its start,
            exactly captum's ``LayerConductance`` (error ~ 1/steps). Same passes either way.

    Returns:
        :class:`BlockAttribution` with per-window masses (see the module docstring).
    """
    if rule not in ("trapezoid", "left"):
        raise DepthprobeError(f"attribution rule must be 'trapezoid' or 'left' (got {rule!r})")
    objective = Objective(stack)
    num_layers, n = len(stack), input_ids.shape[0]
    alphas = [k / steps for k in range(steps + 1)]  # == captum riemann_trapezoid(steps + 1)
    out = {k: np.zeros((num_layers, n)) for k in ("conductance", "gxa", "signed", "target", "baseline_target")}
    out["target"], out["baseline_target"] = np.zeros(n), np.zeros(n)
    batches = range(0, n, batch_size)
    bar = tqdm(
        total=len(batches) * len(alphas), desc="attribution", unit="pass", disable=not progress, leave=False, delay=0.5
    )
    with _frozen(stack.model):
        for batch in token_batches(input_ids, batch_size):
            for key, value in _batch_conductance(objective, objective.place(batch), alphas, rule == "trapezoid",
                                                 bar).items():
                out[key][..., batch.rows] = value
    bar.close()
    return BlockAttribution(out["conductance"], out["gxa"], out["signed"], out["target"], out["baseline_target"])


def _batch_conductance(objective: Objective, batch: Batch, alphas: list[float], trapezoid: bool,
                       bar) -> dict[str, np.ndarray]:
    """One batch along the whole path: L1 / signed conductance and gxa ``(L, B)``, targets ``(B,)``."""
    # captum is slow to import and only this sweep needs it
    from captum._utils.gradient import compute_layer_gradients_and_eval

    model, layers = objective.stack.model, list(objective.stack.blocks)
    last: list[torch.Tensor] = []

    def f(*args):  # the target, remembering its value at the current path point
        value = objective.target(*args)
        last[:] = [value.detach()]
        return value

    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch.input_ids).detach()
    extra = objective.target_extra(batch)
    baseline = mean_embedding(model).to(embeds.dtype).expand_as(embeds)
    attr: list[torch.Tensor] | None = None
    prev: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
    for k, alpha in enumerate(alphas):
        point = (baseline + alpha * (embeds - baseline)).requires_grad_()
        grads, evals = compute_layer_gradients_and_eval(f, layers, (point,), additional_forward_args=(extra,))
        grads = [g[0].detach().double() for g in grads]
        evals = [e[0].detach().double() for e in evals]
        if prev is not None:
            weights = [(pg + g) / 2 for pg, g in zip(prev[0], grads, strict=True)] if trapezoid else prev[0]
            step = [w * (e - pe) for w, pe, e in zip(weights, prev[1], evals, strict=True)]
            attr = step if attr is None else [a + s for a, s in zip(attr, step, strict=True)]
        prev = (grads, evals)
        if k == 0:
            baseline_target = last[0].double().cpu().numpy()
        bar.update(1)
    return {
        "conductance": np.stack([a.abs().sum((1, 2)).cpu().numpy() for a in attr]),
        "signed": np.stack([a.sum((1, 2)).cpu().numpy() for a in attr]),
        "gxa": np.stack([(g * e).abs().sum((1, 2)).cpu().numpy() for g, e in zip(*prev, strict=True)]),
        "target": last[0].double().cpu().numpy(),  # alpha = 1: the real input
        "baseline_target": baseline_target,
    }


def mean_embedding(model: torch.nn.Module, chunk: int = 4096) -> torch.Tensor:
    """The average token: ``mean_v embed(v)`` over the vocabulary, ``(d,)`` (the path's start).

    A zero baseline is a bad start for models whose first operation is an RMSNorm: the
    norm is scale-invariant away from 0 and very steep near it, so all of ``f``'s change
    would sit in a sliver of the path that a Riemann sum misses.
    """
    embed = model.get_input_embeddings()
    vocab = embed.weight.shape[0]
    device = embed.weight.device
    total = None
    with torch.no_grad():
        for start in range(0, vocab, chunk):
            part = embed(torch.arange(start, min(vocab, start + chunk), device=device)).double().sum(0)
            total = part if total is None else total + part
    return (total / vocab).float()


def normalise(masses: np.ndarray) -> np.ndarray:
    """Per-layer masses ``(L, N)`` (or ``(L,)``) summed over windows, divided by their total."""
    total = np.asarray(masses, float).reshape(masses.shape[0], -1).sum(1)
    return total / total.sum()


def attribution_sweep(ctx: SweepContext) -> SweepOutput:
    """``--metrics attribution``: columns ``attribution`` and ``attribution_gxa``, table
    ``attribution_windows`` (layer, window, attribution, attribution_gxa: un-normalised L1
    masses per window, for bootstrap statistics), summary ``attribution_convergence_delta``
    (max over blocks and windows of |delta| / |f(e) - f(e')|)."""
    t0 = time.perf_counter()
    options = ctx.options.attribution
    batch = options.batch_size or ctx.batch_size
    res = block_conductance(ctx.stack, ctx.windows.input_ids, options.steps, batch, ctx.progress)
    # torchrun: every process's windows, in window order (no-op with one process)
    res = BlockAttribution(*(distributed.gather(getattr(res, f.name)) for f in dataclasses.fields(res)))
    num_layers, n = res.conductance.shape
    windows = pd.DataFrame(
        {
            "layer": np.repeat(np.arange(num_layers), n),
            "window": np.tile(np.arange(n), num_layers),
            "attribution": res.conductance.ravel(),
            "attribution_gxa": res.gxa.ravel(),
        }
    )
    scale = np.abs(res.target - res.baseline_target)
    rel = np.abs(res.convergence_delta) / np.where(scale > 0, scale, np.nan)
    summary = {
        "attribution_steps": options.steps,
        "attribution_convergence_delta": float(np.nanmax(rel)) if np.isfinite(rel).any() else None,
    }
    log.info("attribution: %d steps, max relative convergence delta %s", options.steps,
             summary["attribution_convergence_delta"])
    return SweepOutput(
        columns={"attribution": normalise(res.conductance), "attribution_gxa": normalise(res.gxa)},
        tables={"attribution_windows": windows},
        summary=summary,
        seconds=time.perf_counter() - t0,
    )
