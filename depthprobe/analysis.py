"""`analyze`: one streaming pass of hooks over the calibration windows -> per-layer table.

The main pass runs the model's own forward (and, for ``grad``, one backward) batch after
batch. Block hooks turn each block's input and output into running sums and drop the
activations, so memory does not grow with the number of windows. Sweeps that need more
passes (``drop``, ``attribution``) are separate functions registered in :data:`SWEEPS`; they
receive a :class:`SweepContext` and add columns to the same table.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from depthprobe.caveats import caveats
from depthprobe.data import Windows, make_windows
from depthprobe.errors import DepthprobeError
from depthprobe.model.stack import LayerStack
from depthprobe.probes import metrics as M
from depthprobe.probes.hooks import only_blocks_require_grad, watch_blocks
from depthprobe.results import AnalysisResult, angular_matrix_frame

log = logging.getLogger(__name__)

#: metrics of the main pass; names accepted by ``--metrics``
PASS_METRICS = ("angular", "variance", "grad", "lens")
DEFAULT_METRICS = ("angular", "variance", "grad", "lens")


@dataclass(frozen=True)
class ProbeConfig:
    """What to measure and on which tokens; saved in ``summary.json`` with every result."""

    metrics: tuple[str, ...] = DEFAULT_METRICS
    num_sequences: int = 8  # windows of calibration text
    seq_len: int = 256  # tokens per window
    batch_size: int = 4  # windows per forward pass: the memory knob
    text_file: str | None = None
    dataset: str | None = None  # NAME[:CONFIG[:SPLIT]]
    layers_path: str | None = None  # override where the blocks live
    options: dict = field(default_factory=dict)  # per-sweep options (e.g. attribution steps)

    def __post_init__(self):
        known = set(PASS_METRICS) | set(SWEEPS)
        unknown = [m for m in self.metrics if m not in known]
        if unknown:
            raise DepthprobeError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
        if self.batch_size < 1:
            raise DepthprobeError(f"--batch-size must be at least 1 (got {self.batch_size})")


@dataclass
class SweepContext:
    """What a sweep gets: the stack, the windows and the main pass's reference values."""

    stack: LayerStack
    windows: Windows
    config: ProbeConfig
    objective: str  # "lm_loss" or "cosine_drift"
    base_loss: float | None
    base_nll_per_window: np.ndarray | None  # (N,) mean-token loss of each window
    progress: bool = True


@dataclass
class SweepOutput:
    columns: dict[str, Sequence[float]] = field(default_factory=dict)  # per-layer columns
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    seconds: float = 0.0


def _sweep(module: str, name: str) -> Callable[[SweepContext], SweepOutput]:
    def run(ctx: SweepContext) -> SweepOutput:
        import importlib

        return getattr(importlib.import_module(module), name)(ctx)

    return run


#: extra sweeps: metric name -> function(SweepContext) -> SweepOutput (imported on use)
SWEEPS: dict[str, Callable[[SweepContext], SweepOutput]] = {
    "drop": _sweep("depthprobe.prune.sweep", "drop_sweep"),
    "attribution": _sweep("depthprobe.probes.attribution", "attribution_sweep"),
}


def parse_metrics(metrics: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    if not metrics:
        raise DepthprobeError("--metrics is empty; e.g. --metrics angular,variance,grad")
    return tuple(dict.fromkeys(metrics))


def analyze(
    model: torch.nn.Module,
    tokenizer=None,
    *,
    metrics: str | Sequence[str] = DEFAULT_METRICS,
    num_sequences: int = 8,
    seq_len: int = 256,
    batch_size: int = 4,
    text_file: str | None = None,
    dataset: str | None = None,
    windows: Windows | None = None,
    layers_path: str | None = None,
    stack: LayerStack | None = None,
    model_name: str | None = None,
    progress: bool = True,
    options: dict | None = None,
) -> AnalysisResult:
    """Measure every block of ``model`` on calibration windows.

    Args:
        model: a causal LM (with head) or an encoder, as returned by :func:`load_model`.
        tokenizer: used to make the windows (not needed when ``windows`` is given).
        metrics: any of ``angular,variance,grad,lens,drop,attribution`` (string or list).
        num_sequences, seq_len: ``N`` windows of ``T`` tokens of the calibration text.
        batch_size: windows per forward pass.
        text_file, dataset: calibration text (default: the built-in corpus).
        windows: ready-made windows (overrides the text options).
        layers_path: where the blocks are, for models depthprobe does not know.

    Returns:
        :class:`AnalysisResult` with ``.layers`` (one row per block), ``.angular_distance``,
        ``.summary`` and ``.save(dir)``.

    Example:
        >>> model, tok = depthprobe.load_model("smollm2")                     # doctest: +SKIP
        >>> r = depthprobe.analyze(model, tok, metrics="angular,grad", num_sequences=4)  # doctest: +SKIP
        >>> r.layers.sort_values("angular_distance").head()                 # doctest: +SKIP
    """
    config = ProbeConfig(
        metrics=parse_metrics(metrics),
        num_sequences=windows.num_sequences if windows is not None else num_sequences,
        seq_len=windows.seq_len if windows is not None else seq_len,
        batch_size=batch_size,
        text_file=str(text_file) if text_file else None,
        dataset=dataset,
        layers_path=layers_path,
        options=dict(options or {}),
    )
    stack = stack or LayerStack.from_model(model, layers_path)
    if windows is None:
        if tokenizer is None:
            raise DepthprobeError("analyze needs a tokenizer or ready-made windows")
        windows = make_windows(
            tokenizer,
            num_sequences=config.num_sequences,
            seq_len=config.seq_len,
            text_file=config.text_file,
            dataset=config.dataset,
            max_positions=max_positions(model),
        )
    objective = "lm_loss" if stack.is_causal_lm else "cosine_drift"
    notes: list[str] = []
    wanted = set(config.metrics)
    if "grad" in wanted and objective != "lm_loss":
        notes.append("grad: no gradient metrics: this model has no LM head (an encoder), so no training objective")

    log.info("analyze %s: %d blocks, metrics %s, %d windows x %d tokens of %s", type(model).__name__, len(stack),
             ",".join(config.metrics), windows.num_sequences, windows.seq_len, windows.source)
    was_training = model.training
    model.eval()
    try:
        stats = _main_pass(stack, windows, config, objective, progress)
    finally:
        model.train(was_training)

    log.info("main pass done in %.1f s (base loss %s)", stats.timings["pass"],
             None if stats.base_loss is None else round(stats.base_loss, 4))
    columns: dict[str, Sequence[float]] = dict(stats.columns)
    timings = dict(stats.timings)
    tables: dict[str, pd.DataFrame] = {}
    summary_extra: dict = {}
    ctx = SweepContext(stack, windows, config, objective, stats.base_loss, stats.window_nll, progress)
    interrupted = None
    for name in config.metrics:
        if name in SWEEPS:
            t0 = time.perf_counter()
            try:
                out = SWEEPS[name](ctx)
            except KeyboardInterrupt:
                # keep the main pass and the finished sweeps; the caller saves and reports
                interrupted = name
                notes.append(f"interrupted during the {name} sweep; the metrics before it are complete")
                break
            columns.update(out.columns)
            tables.update(out.tables)
            summary_extra.update(out.summary)
            timings[name] = out.seconds or (time.perf_counter() - t0)
            log.info("%s sweep done in %.1f s", name, timings[name])

    layers = pd.DataFrame({"layer": np.arange(len(stack)), **{k: np.asarray(v, float) for k, v in columns.items()}})
    nonfinite = {
        c: [int(i) for i in layers["layer"][~np.isfinite(layers[c])]]
        for c in layers.columns
        if c != "layer" and not np.isfinite(layers[c]).all()
    }
    if nonfinite:
        first = min(min(v) for v in nonfinite.values())
        notes.append(
            f"non-finite values from layer {first} on in {', '.join(nonfinite)}: the model produced NaN/inf "
            "activations (check the weights, or use --dtype float32)"
        )
    summary = {
        "model": model_name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__,
        "architecture": type(model).__name__,
        "family": stack.family,
        "blocks_path": stack.blocks_path,
        "norm_placement": stack.norm_placement,
        "num_layers": len(stack),
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "num_sequences": windows.num_sequences,
        "seq_len": windows.seq_len,
        "num_tokens": int(windows.input_ids.numel()),
        "text_source": windows.source,
        "objective": objective,
        "base_loss": stats.base_loss,
        "base_perplexity": math.exp(stats.base_loss) if stats.base_loss is not None else None,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(stack.device),
        "metrics": list(config.metrics),
        "timings_s": timings,
        "versions": versions(),
        "notes": notes,
        "nonfinite": nonfinite,
        "interrupted": interrupted,
        "config": dataclasses.asdict(config),
        **summary_extra,
    }
    result = AnalysisResult(
        layers=layers,
        summary=summary,
        angular_distance=angular_matrix_frame(stats.angular_matrix) if stats.angular_matrix is not None else None,
        tables=tables,
    )
    # drop intervals, proxies.csv and the verdict, when the drop sweep ran (else unchanged)
    from depthprobe.stats import add_proxy_statistics

    result = add_proxy_statistics(
        result,
        n_boot=int(config.options.get("bootstrap_samples", 1000)),
        seed=int(config.options.get("bootstrap_seed", 0)),
    )
    result.summary["notes"].extend(caveats(result.summary))  # statistics from too little data say so
    return result


@dataclass
class _PassStats:
    columns: dict[str, list[float]]
    timings: dict[str, float]
    base_loss: float | None
    window_nll: np.ndarray | None
    angular_matrix: list[list[float]] | None


def _main_pass(
    stack: LayerStack, windows: Windows, config: ProbeConfig, objective: str, progress: bool
) -> _PassStats:
    """One forward (+ backward for ``grad``) over all windows with streaming block hooks."""
    wanted = set(config.metrics)
    num_layers = len(stack)
    do_angular = "angular" in wanted
    do_variance = "variance" in wanted
    do_lens = "lens" in wanted
    do_grad = "grad" in wanted and objective == "lm_loss"
    lm = objective == "lm_loss"

    sums = {k: np.zeros(num_layers) for k in ("var", "rms", "lens")}
    max_abs = np.full(num_layers, -np.inf)
    n_states = num_layers + 1
    ang_sum = torch.zeros(n_states, n_states, dtype=torch.float64)
    cos_sum = torch.zeros(n_states, n_states, dtype=torch.float64)
    hook_seconds = {"angular": 0.0, "variance": 0.0, "lens": 0.0}
    total_tokens = 0  # hidden-state tokens
    total_pred = windows.num_sequences * (windows.seq_len - 1)  # next-token predictions
    nll_sum = 0.0
    window_nll: list[float] = []

    units: list[torch.Tensor | None] = [None] * n_states
    final_units: list[torch.Tensor | None] = [None] * num_layers
    batch_ids: torch.Tensor | None = None

    def on_block(layer: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        with torch.no_grad():
            if do_angular or (do_lens and not lm):
                t0 = time.perf_counter()
                if layer == 0:
                    units[0] = M.unit(x_in)
                units[layer + 1] = M.unit(x_out)
                hook_seconds["angular"] += time.perf_counter() - t0
            if do_variance:
                t0 = time.perf_counter()
                sums["var"][layer] += M.variance_sum(x_out)
                sums["rms"][layer] += M.rms_sum(x_out)
                max_abs[layer] = max(max_abs[layer], M.max_abs(x_out))
                hook_seconds["variance"] += time.perf_counter() - t0
            if do_lens:
                t0 = time.perf_counter()
                if lm:
                    nll, _ = M.next_token_nll_sum(stack.logits(x_out.detach()), batch_ids)
                    sums["lens"][layer] += float(nll)
                elif stack.final_norm is not None:
                    final_units[layer] = M.unit(stack.final_hidden(x_out.detach()))
                hook_seconds["lens"] += time.perf_counter() - t0

    grad_ctx = only_blocks_require_grad(stack) if do_grad else _null()
    t_pass = time.perf_counter()
    grad_norms: dict[str, list[float]] = {}
    with grad_ctx, watch_blocks(stack, on_block):
        bar = tqdm(
            total=windows.num_sequences, desc="analyze", unit="seq", disable=not progress, leave=False, delay=0.5
        )
        for batch in windows.batches(config.batch_size):
            batch_ids = batch.to(_input_device(stack))
            with torch.set_grad_enabled(do_grad):
                out = stack.model(input_ids=batch_ids, use_cache=False) if lm else stack.model(input_ids=batch_ids)
                if lm:
                    logits = out.logits
                    nll, count = M.next_token_nll_sum(logits, batch_ids)
                    nll_sum += float(nll.detach())
                    with torch.no_grad():
                        window_nll.extend(M.per_sequence_nll(logits.detach(), batch_ids).tolist())
                    if do_grad:
                        (nll / total_pred).backward()
                    del logits, out
                else:
                    final = out.last_hidden_state.detach()
            total_tokens += batch.numel()
            t0 = time.perf_counter()
            if do_angular:
                a, c = M.angular_gram_sums(units)
                ang_sum += a
                cos_sum += c
            if not lm and do_lens:
                for layer in range(num_layers):
                    src = final_units[layer] if final_units[layer] is not None else units[layer + 1]
                    ref = M.unit(final)
                    sums["lens"][layer] += float((1 - (src * ref).sum(-1).clamp(-1, 1)).sum())
            hook_seconds["angular" if do_angular else "lens"] += time.perf_counter() - t0
            units = [None] * n_states
            final_units = [None] * num_layers
            bar.update(batch.shape[0])
        bar.close()
        if do_grad:
            for layer in range(num_layers):
                grad_norms.setdefault("grad_norm", []).append(M.grad_l2(stack.blocks[layer].parameters()))
                for kind in ("attn", "mlp"):
                    params = [p for m in stack.sublayer_modules(layer, kind) for p in m.parameters()]
                    grad_norms.setdefault(f"grad_norm_{kind}", []).append(M.grad_l2(params) if params else math.nan)
    pass_seconds = time.perf_counter() - t_pass

    columns: dict[str, list[float]] = {}
    matrix = None
    if do_angular:
        mean_ang = (ang_sum / total_tokens).tolist()
        mean_cos = (cos_sum / total_tokens).tolist()
        columns["angular_distance"] = [mean_ang[i][i + 1] for i in range(num_layers)]
        columns["block_influence"] = [1 - mean_cos[i][i + 1] for i in range(num_layers)]
        matrix = mean_ang
    if do_variance:
        columns["activation_variance"] = list(sums["var"] / total_tokens)
        columns["activation_rms"] = list(sums["rms"] / total_tokens)
        columns["max_abs_activation"] = list(max_abs)
    columns.update(grad_norms)
    if do_lens:
        columns["logit_lens_loss"] = list(sums["lens"] / (total_pred if lm else total_tokens))

    timings = {"pass": pass_seconds}
    for name in ("angular", "variance", "lens"):
        if name in wanted:
            timings[name] = hook_seconds[name]
    if do_grad:
        timings["grad"] = pass_seconds - sum(hook_seconds.values())
    base_loss = nll_sum / total_pred if lm else None
    return _PassStats(columns, timings, base_loss, np.asarray(window_nll) if lm else None, matrix)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _input_device(stack: LayerStack) -> torch.device:
    if stack.embed is not None:
        return next(stack.embed.parameters()).device
    return stack.device


def max_positions(model: torch.nn.Module) -> int | None:
    """How many positions the model can take, from its config (None when unbounded)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def versions() -> dict[str, str]:
    import transformers

    import depthprobe

    return {
        "depthprobe": depthprobe.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
