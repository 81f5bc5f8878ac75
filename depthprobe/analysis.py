"""`analyze`: calibration windows -> one streaming main pass -> sweeps -> one per-layer table.

The steps, each a small function:

1. :class:`ProbeConfig`: what to measure and on which tokens (typed sweep options included).
   Data-free metrics (:data:`WEIGHT_SWEEPS`: ``spectra``) run first and, alone, are the whole
   run: no windows, no forward pass.
2. :func:`~depthprobe.probes.main_pass.run_main_pass`: one forward (+ backward for ``grad``)
   over all windows; block hooks feed a streaming accumulator.
3. Sweeps (:data:`SWEEPS`, registered by function reference): passes the main pass cannot
   do (``drop``, ``attribution``), each ``(SweepContext) -> SweepOutput``.
4. :class:`RunSummary`: the typed summary, derived from the table and the steps above.

:func:`measure` stops there; :func:`analyze` adds the proxy statistics of
:mod:`depthprobe.stats` (drop intervals, ``proxies.csv``, the verdict) when the drop sweep ran.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import transformers

from depthprobe import distributed
from depthprobe._version import __version__
from depthprobe.caveats import caveats
from depthprobe.config import (
    ALL_METRICS,
    DEFAULT_METRICS,
    PASS_METRICS,
    PROBE_FIELDS,
    RUN_FIELDS,
    ProbeConfig,
    RunOptions,
    data_free,
    keyword_overrides,
    parse_metrics,
)
from depthprobe.data import Windows, make_windows
from depthprobe.errors import DepthprobeError, one_line, raised_by_depthprobe  # noqa: F401 - also its home before
from depthprobe.inputs import nonfinite_weight_blocks
from depthprobe.model.stack import LayerStack
from depthprobe.probes.applicable import not_applicable_mask, not_applicable_notes
from depthprobe.probes.attribution import attribution_sweep
from depthprobe.probes.drop import drop_sweep
from depthprobe.probes.hooks import evaluating
from depthprobe.probes.layer_major import supports_block_backward
from depthprobe.probes.lens_readout import lens_tokens_sweep, tuned_lens_sweep
from depthprobe.probes.main_pass import PassResult, needs_loss, run_main_pass
from depthprobe.probes.objective import Objective, objective_for
from depthprobe.probes.offload import is_offloaded, use_layer_major
from depthprobe.probes.sweep import Sweep, SweepContext, SweepOptions, SweepOutput
from depthprobe.probes.text_probe import probe_sweep
from depthprobe.probes.weight_spectra import spectra_sweep
from depthprobe.results import AnalysisResult, angular_matrix_frame
from depthprobe.runs import DROP_PROGRESS
from depthprobe.stats import with_proxy_statistics

log = logging.getLogger(__name__)

#: extra sweeps: metric name -> function(SweepContext) -> SweepOutput, run in the order asked
#: (the names are :data:`depthprobe.config.SWEEP_METRICS`)
SWEEPS: dict[str, Sweep] = {"drop": drop_sweep, "attribution": attribution_sweep, "probe": probe_sweep,
                            "tuned-lens": tuned_lens_sweep}
#: data-free metrics: name -> function(stack, progress) -> SweepOutput, run before any pass (an
#: empty result fails fast); alone they need no text (:data:`depthprobe.config.WEIGHT_METRICS`)
WEIGHT_SWEEPS = {"spectra": spectra_sweep}

__all__ = [
    "ALL_METRICS", "DEFAULT_METRICS", "PASS_METRICS", "SWEEPS", "ProbeConfig", "RunOptions", "RunSummary", "SweepContext",
    "SweepOutput", "analyze", "max_positions", "measure", "parse_metrics",
]


def analyze(
    model: torch.nn.Module,
    tokenizer=None,
    config: ProbeConfig | None = None,
    *,
    windows: Windows | torch.Tensor | None = None,
    stack: LayerStack | None = None,
    run: RunOptions | None = None,
    **keywords,
) -> AnalysisResult:
    """Measure every block of ``model`` on calibration windows.

    Args:
        model: a causal LM (with head) or an encoder, as returned by :func:`load_model`.
        tokenizer: used to make the windows (not needed when ``windows`` is given).
        config: :class:`~depthprobe.config.ProbeConfig`: metrics (any of
            ``angular,variance,grad,lens,drop,attribution``), ``num_sequences`` windows of
            ``seq_len`` tokens of the calibration text (``text_file`` / ``dataset``, default the
            built-in corpus), ``batch_size``, ``layers_path`` and the typed sweep ``options``
            (:class:`~depthprobe.config.SweepOptions`, or a flat dict of its names).
        windows: ready-made windows (:class:`~depthprobe.data.Windows` or an ``(N, T)`` tensor of
            token ids; they override the text options of ``config``).
        stack: a ready :class:`LayerStack` of ``model``.
        run: :class:`~depthprobe.config.RunOptions`: progress bars, ``progress_dir`` where the
            drop sweep appends its finished batches (``drop_progress.jsonl``, removed when the
            run completes, so Ctrl-C loses nothing), ``resume`` from it, ``loss`` (compute the base
            loss; default: when a metric other than angular / variance is asked) and ``model_name``.
        **keywords: deprecated, for one release: the fields of ``ProbeConfig`` and ``RunOptions``
            by name (``metrics="angular,grad", num_sequences=4, progress=False``), as before.

    Returns:
        :class:`AnalysisResult` with ``.layers`` (one row per block), ``.angular_distance``,
        ``.summary`` and ``.save(dir)``; with ``drop``, also drop intervals, ``proxies`` and
        the verdict (:func:`depthprobe.stats.with_proxy_statistics`).

    Example:
        >>> model, tok = depthprobe.load_model("smollm2")                                      # doctest: +SKIP
        >>> r = depthprobe.analyze(model, tok, ProbeConfig(metrics="angular,grad", num_sequences=4))  # doctest: +SKIP
        >>> r.layers.sort_values("angular_distance").head()                                  # doctest: +SKIP
    """
    config, run = from_keywords(config, run, keywords)
    if isinstance(windows, torch.Tensor):  # token ids the caller made
        windows = Windows(windows, "token ids passed to analyze")
    if windows is not None:  # the config records the windows measured
        config = dataclasses.replace(config, num_sequences=windows.num_sequences, seq_len=windows.seq_len)
    if not distributed.is_main():  # under torchrun rank 0 keeps the progress file and shows the bar
        run = dataclasses.replace(run, progress_dir=None, progress=False)
    config = dataclasses.replace(config, options=_with_progress_file(config.options, config.metrics, run))
    result = measure(model, tokenizer, config, windows=windows, stack=stack, model_name=run.model_name,
                     progress=run.progress, loss=run.loss)
    if run.progress_dir is not None and not result.summary["interrupted"]:
        (Path(run.progress_dir) / DROP_PROGRESS).unlink(missing_ok=True)
    result = with_proxy_statistics(result, config.options.bootstrap)
    # statistics from too little data say so (summary notes: printed by the CLI, in the report)
    result.summary["notes"] = [*result.summary.get("notes", []), *caveats(result.summary)]
    return result


def from_keywords(config: ProbeConfig | None, run: RunOptions | None,
                  keywords: Mapping) -> tuple[ProbeConfig, RunOptions]:
    """The deprecated keyword form of :func:`analyze` (``metrics=..., progress=...``) as
    ``(ProbeConfig, RunOptions)``; a keyword overrides that field of ``config`` / ``run``."""
    probe, run_keywords = keyword_overrides("analyze", keywords, PROBE_FIELDS, RUN_FIELDS)
    config = dataclasses.replace(config or ProbeConfig(), **{k: v for k, v in probe.items() if v is not None})
    run = dataclasses.replace(run or RunOptions(), **run_keywords)
    return config, run


def _with_progress_file(options: SweepOptions, metrics: Sequence[str], run: RunOptions) -> SweepOptions:
    """Point the drop sweep at ``progress_dir/drop_progress.jsonl``; a stale file is removed
    unless resuming."""
    if run.resume and run.progress_dir is None:
        raise DepthprobeError("--resume needs --out (the folder of the interrupted run)")
    if run.progress_dir is None or "drop" not in metrics:
        return options
    path = Path(run.progress_dir) / DROP_PROGRESS
    if path.exists() and not run.resume:
        path.unlink()
    return dataclasses.replace(options, drop=dataclasses.replace(options.drop, progress_file=str(path)))


def measure(model: torch.nn.Module, tokenizer, config: ProbeConfig, *, windows: Windows | None = None,
            stack: LayerStack | None = None, model_name: str | None = None, progress: bool = True,
            loss: bool | None = None) -> AnalysisResult:
    """The measurements of :func:`analyze` (main pass, sweeps, summary), without statistics."""
    stack = stack or LayerStack.from_model(model, config.layers_path)
    progress = progress and distributed.is_main()
    objective = objective_for(stack)
    weights = {name: sweep(stack, progress) for name, sweep in WEIGHT_SWEEPS.items() if name in config.metrics}
    if data_free(config.metrics):  # weights only: no text, no forward pass
        return _result(model, stack, None, config, objective, Measured(_no_pass(), weights, None, None), model_name)
    windows = windows if windows is not None else _windows(model, tokenizer, config)
    log.info("analyze %s: %d blocks, metrics %s, %d windows x %d tokens of %s", type(model).__name__, len(stack),
             ",".join(config.metrics), windows.num_sequences, windows.seq_len, windows.source)
    if stack.device.type == "cuda":  # summary.json reports this run's CUDA peak
        torch.cuda.reset_peak_memory_stats(stack.device)
    # under torchrun each process measures its share of the windows; results are reduced
    with distributed.split_windows(windows) as local:
        with evaluating(model):
            main = _main_pass(stack, local, config, needs_loss(config.metrics) if loss is None else loss, progress)
        ctx = SweepContext(stack, local, objective, config.batch_size, config.options, main.base_loss,
                           main.window_nll, progress, tokenizer)
        log.info("main pass done (base loss %s)", None if main.base_loss is None else round(main.base_loss, 4))
        sweeps, interrupted = run_sweeps(ctx, config.metrics)
        if config.options.lens.positions and not interrupted:  # --lens-positions: lens_tokens.csv
            sweeps["lens-tokens"] = lens_tokens_sweep(ctx)
    return _result(model, stack, windows, config, objective, Measured(main, weights | sweeps, interrupted, None),
                   model_name)


def _no_pass() -> PassResult:
    """The main pass of a data-free run: nothing measured."""
    return PassResult(columns={}, timings={}, base_loss=None, window_nll=None, angular_matrix=None)


def _result(model, stack: LayerStack, windows: Windows | None, config: ProbeConfig, objective: Objective,
            measured: Measured, model_name: str | None) -> AnalysisResult:
    """The per-layer table, the summary and the extra tables of what was measured."""
    main, sweeps = measured.main, measured.sweeps
    layers = pd.DataFrame({"layer": np.arange(len(stack)),
                           **{k: np.asarray(v, float) for k, v in main.columns.items()},
                           **{k: np.asarray(v, float) for out in sweeps.values() for k, v in out.columns.items()}})
    measured = dataclasses.replace(measured, layers=layers)
    summary = RunSummary.build(model, stack, windows, config, objective, measured, model_name)
    return AnalysisResult(
        layers=layers,
        summary=summary.to_dict(),
        angular_distance=angular_matrix_frame(main.angular_matrix) if main.angular_matrix is not None else None,
        tables={name: table for out in sweeps.values() for name, table in out.tables.items()},
    )


def _main_pass(stack: LayerStack, windows: Windows, config: ProbeConfig, loss: bool, progress: bool) -> PassResult:
    """Batch-major (the model's own forward), or layer-major when asked or offloaded (a
    backward then runs block by block, unless blocks share parameters)."""
    execution = config.options.execution
    backward = "grad" in config.metrics and stack.is_causal_lm
    layer_major = use_layer_major(execution.order, stack.model)
    if layer_major and backward and not supports_block_backward(stack):
        if is_offloaded(stack.model):
            raise DepthprobeError("--metrics grad on offloaded weights runs the backward block by block, which needs "
                                  "each parameter in one block, and this model shares parameters between blocks; "
                                  "drop grad or raise --max-memory")
        layer_major = False  # in memory: the model's own backward
    execution = dataclasses.replace(execution, order="layer" if layer_major else "batch")
    return run_main_pass(stack, windows, config.metrics, batch_size=config.batch_size, loss=loss, progress=progress,
                         execution=execution)


def _windows(model: torch.nn.Module, tokenizer, config: ProbeConfig) -> Windows:
    if tokenizer is None:
        raise DepthprobeError("analyze needs a tokenizer or ready-made windows")
    return make_windows(tokenizer, num_sequences=config.num_sequences, seq_len=config.seq_len,
                        text_file=config.text_file, dataset=config.dataset, max_positions=max_positions(model))


def run_sweeps(ctx: SweepContext, metrics: Sequence[str]) -> tuple[dict[str, SweepOutput], str | None]:
    """Run the requested sweeps in order; a Ctrl-C keeps those finished and names the one cut.

    A sweep the model's own forward refuses (it breaks when blocks are skipped) is left out
    with its one-line reason in the sweep's ``not_applicable``; the others still run, so the
    main pass and every finished sweep are kept. An error raised in depthprobe's own code is
    a bug and propagates.
    """
    done: dict[str, SweepOutput] = {}
    for name in metrics:
        if name not in SWEEPS:
            continue
        t0 = time.perf_counter()
        try:
            out = SWEEPS[name](ctx)
        except KeyboardInterrupt:  # the caller saves what is finished and says how to resume
            return done, name
        except (RuntimeError, ValueError, IndexError) as exc:
            if raised_by_depthprobe(exc):
                raise
            out = SweepOutput(columns={}, not_applicable={name: sweep_unsupported(ctx, name, exc)})
        out.seconds = out.seconds or (time.perf_counter() - t0)
        done[name] = out
    return done, None


def sweep_unsupported(ctx: SweepContext, name: str, exc: Exception) -> str:
    """The reason, in one line, for an architecture whose forward breaks when a sweep skips or
    replaces blocks (layers that read state an earlier layer left: shared KV caches, shared indexers)."""
    model_type = getattr(getattr(ctx.stack.model, "config", None), "model_type", None)
    log.debug("the %s sweep failed", name, exc_info=exc)
    return (f"not supported for {type(ctx.stack.model).__name__} (model_type={model_type!r}): its forward fails "
            f"when blocks are skipped ({one_line(exc)}); its blocks likely share state across layers")


@dataclass
class Measured:
    """What :func:`measure` got: the main pass, the finished sweeps (and the one a Ctrl-C cut)
    and the per-layer table built from them."""

    main: PassResult
    sweeps: dict[str, SweepOutput]
    interrupted: str | None
    layers: pd.DataFrame | None


@dataclass
class RunSummary:
    """``summary.json``: what was measured, on what, how long it took and what to know.

    A metric that does not apply (no LM head for ``grad``, no attention sublayer for
    ``grad_norm_attn``...) is left empty with ``"<name>: <reason>"`` in ``notes`` and is not
    an error; ``nonfinite`` lists only computed columns with NaN/inf values.
    """

    model: str
    architecture: str
    family: str
    blocks_path: str
    norm_placement: str
    num_layers: int
    num_parameters: int
    num_sequences: int
    seq_len: int
    num_tokens: int
    text_source: str
    objective: str
    base_loss: float | None
    base_perplexity: float | None
    dtype: str
    device: str
    metrics: list[str]
    timings_s: dict[str, float]
    versions: dict[str, str]
    notes: list[str]
    nonfinite: dict[str, list[int]]
    interrupted: str | None
    config: dict
    unsupported: dict[str, str] = field(default_factory=dict)  # sweep -> why the model's forward refused it
    extra: dict = field(default_factory=dict)  # entries the sweeps add (e.g. drop_base_loss)
    nonfinite_weights: list[int] = field(default_factory=list)  # blocks holding NaN/inf weights

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**data, **self.extra}

    @classmethod
    def build(cls, model, stack: LayerStack, windows: Windows | None, config: ProbeConfig, objective: Objective,
              measured: Measured, model_name: str | None) -> RunSummary:
        main, sweeps, interrupted, layers = measured.main, measured.sweeps, measured.interrupted, measured.layers
        not_applicable = {**not_applicable_metrics(config.metrics, objective), **main.not_applicable,
                          **{k: v for out in sweeps.values() for k, v in out.not_applicable.items()}}
        timings = dict(main.timings) | {name: out.seconds for name, out in sweeps.items()}
        # per block: a sublayer or router column applies only to blocks that have that part
        applies = {c: not_applicable_mask(stack, c) for c in layers.columns if c != "layer"}
        part_notes = not_applicable_notes(stack, layers.columns)
        covered = {line.split(":", 1)[0] for line in part_notes}
        nonfinite = nonfinite_layers(layers, skip=not_applicable, applies=applies)
        notes = [f"{name}: {reason}" for name, reason in not_applicable.items() if name not in covered] + part_notes
        if interrupted:
            notes.append(f"interrupted during the {interrupted} sweep; the metrics before it are complete")
        # NaN/inf weights make non-finite metrics: scanned only then (not a full read of every run)
        bad_weights = nonfinite_weight_blocks(stack) if nonfinite else []
        if bad_weights:
            notes.append(f"NaN/inf weights in block(s) {', '.join(map(str, bad_weights))}: their metrics, and those "
                         "of every later block, are not meaningful")
        if nonfinite:
            notes.append(nonfinite_note(nonfinite))
        return cls(
            model=model_name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__,
            architecture=type(model).__name__, family=stack.family, blocks_path=stack.blocks_path,
            norm_placement=stack.norm_placement, num_layers=len(stack),
            num_parameters=int(sum(p.numel() for p in model.parameters())),
            num_sequences=windows.num_sequences if windows else 0, seq_len=windows.seq_len if windows else 0,
            num_tokens=int(windows.input_ids.numel()) if windows else 0,
            text_source=windows.source if windows else "none (data-free metrics)", objective=objective.name, base_loss=main.base_loss,
            base_perplexity=math.exp(main.base_loss) if main.base_loss is not None else None,
            dtype=str(next(model.parameters()).dtype).replace("torch.", ""), device=str(stack.device),
            metrics=list(config.metrics), timings_s=timings, versions=versions(), notes=notes, nonfinite=nonfinite,
            interrupted=interrupted, config=config.to_dict(),
            unsupported={name: out.not_applicable[name] for name, out in sweeps.items() if name in out.not_applicable},
            extra={k: v for out in sweeps.values() for k, v in out.summary.items()}
            | ({"cuda_peak_memory_bytes": torch.cuda.max_memory_allocated(stack.device)}
               if stack.device.type == "cuda" else {}),
            nonfinite_weights=bad_weights,
        )


def not_applicable_metrics(metrics: Sequence[str], objective: Objective) -> dict[str, str]:
    """Requested metrics this model cannot have, with the reason (left empty, never an error)."""
    reasons = {}
    if "grad" in metrics and not objective.lm:
        reasons["grad"] = "no gradient metrics: this model has no LM head (an encoder), so no training objective"
    return reasons


def nonfinite_layers(layers: pd.DataFrame, skip: Mapping[str, str] = (),
                     applies: Mapping[str, np.ndarray] | None = None) -> dict[str, list[int]]:
    """Computed columns with NaN/inf values -> the layers where they occur (``skip``: columns
    that are not applicable, whose empty cells are expected; ``applies``: per column, the
    blocks it applies to — empty cells elsewhere are expected too)."""
    applies = applies or {}
    found = {}
    for c in layers.columns:
        if c == "layer" or c in skip:
            continue
        bad = ~np.isfinite(layers[c].to_numpy(float)) & applies.get(c, np.ones(len(layers), bool))
        if bad.any():
            found[c] = [int(i) for i in layers["layer"][bad]]
    return found


def nonfinite_note(nonfinite: dict[str, list[int]]) -> str:
    first = min(min(v) for v in nonfinite.values())
    return (f"non-finite values from layer {first} on in {', '.join(nonfinite)}: the model produced NaN/inf "
            "activations (check the weights, or use --dtype float32)")


def max_positions(model: torch.nn.Module) -> int | None:
    """How many positions the model can take, from its config (None when unbounded)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def versions() -> dict[str, str]:
    return {
        "depthprobe": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
