"""`analyze`: calibration windows -> one streaming main pass -> sweeps -> one per-layer table.

The steps, each a small function:

1. :class:`ProbeConfig`: what to measure and on which tokens (typed sweep options included).
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

from depthprobe import __version__, distributed
from depthprobe.caveats import caveats
from depthprobe.data import Windows, make_windows
from depthprobe.errors import DepthprobeError
from depthprobe.inputs import nonfinite_weight_blocks
from depthprobe.model.stack import LayerStack
from depthprobe.probes.applicable import not_applicable_mask, not_applicable_notes
from depthprobe.probes.attribution import attribution_sweep
from depthprobe.probes.drop import drop_sweep
from depthprobe.probes.hooks import evaluating
from depthprobe.probes.layer_major import supports_block_backward
from depthprobe.probes.main_pass import DEFAULT_METRICS, PASS_METRICS, PassResult, needs_loss, run_main_pass
from depthprobe.probes.objective import Objective, objective_for
from depthprobe.probes.offload import is_offloaded, use_layer_major
from depthprobe.probes.sweep import Sweep, SweepContext, SweepOptions, SweepOutput
from depthprobe.results import DROP_PROGRESS, AnalysisResult, angular_matrix_frame, parse_list
from depthprobe.stats import with_proxy_statistics

log = logging.getLogger(__name__)

#: extra sweeps: metric name -> function(SweepContext) -> SweepOutput, run in the order asked
SWEEPS: dict[str, Sweep] = {"drop": drop_sweep, "attribution": attribution_sweep}

#: every name ``--metrics`` accepts
ALL_METRICS = (*PASS_METRICS, *SWEEPS)

__all__ = [
    "ALL_METRICS", "DEFAULT_METRICS", "PASS_METRICS", "SWEEPS", "ProbeConfig", "RunSummary", "SweepContext",
    "SweepOutput", "analyze", "max_positions", "measure", "parse_metrics",
]


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
    options: SweepOptions = field(default_factory=SweepOptions)  # typed per-sweep options (a flat dict is parsed)

    def __post_init__(self):
        known = set(PASS_METRICS) | set(SWEEPS)
        unknown = [m for m in self.metrics if m not in known]
        if unknown:
            raise DepthprobeError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
        if self.batch_size < 1:
            raise DepthprobeError(f"--batch-size must be at least 1 (got {self.batch_size})")
        object.__setattr__(self, "options", SweepOptions.parse(self.options))

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "metrics": list(self.metrics), "options": self.options.flat()}


def parse_metrics(metrics: str | Sequence[str]) -> tuple[str, ...]:
    """``"angular,grad"`` or a list -> a tuple without repeats (order kept)."""
    names = parse_list(metrics, "--metrics") if isinstance(metrics, str) else list(metrics)
    if not names:
        raise DepthprobeError("--metrics is empty; e.g. --metrics angular,variance,grad")
    return tuple(dict.fromkeys(names))


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
    options: SweepOptions | Mapping | None = None,
    loss: bool | None = None,
    progress_dir: str | Path | None = None,
    resume: bool = False,
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
        options: :class:`~depthprobe.probes.sweep.SweepOptions`, or a flat dict of its names
            (``block_sizes``, ``sublayers``, ``attribution_steps``, ``bootstrap_samples``...);
            an unknown name is an error.
        loss: compute the base loss (default: when a metric other than angular / variance
            is asked; those two alone never run the LM head).
        progress_dir: folder where the drop sweep appends its finished batches
            (``drop_progress.jsonl``, removed when the run completes), so Ctrl-C loses nothing.
        resume: continue from the progress file in ``progress_dir`` instead of restarting.

    Returns:
        :class:`AnalysisResult` with ``.layers`` (one row per block), ``.angular_distance``,
        ``.summary`` and ``.save(dir)``; with ``drop``, also drop intervals, ``proxies`` and
        the verdict (:func:`depthprobe.stats.with_proxy_statistics`).

    Example:
        >>> model, tok = depthprobe.load_model("smollm2")                     # doctest: +SKIP
        >>> r = depthprobe.analyze(model, tok, metrics="angular,grad", num_sequences=4)  # doctest: +SKIP
        >>> r.layers.sort_values("angular_distance").head()                 # doctest: +SKIP
    """
    if not distributed.is_main():  # under torchrun rank 0 keeps the progress file and shows the bar
        progress_dir, progress = None, False
    config = ProbeConfig(
        metrics=parse_metrics(metrics),
        num_sequences=windows.num_sequences if windows is not None else num_sequences,
        seq_len=windows.seq_len if windows is not None else seq_len,
        batch_size=batch_size,
        text_file=str(text_file) if text_file else None,
        dataset=dataset,
        layers_path=layers_path,
        options=_with_progress_file(SweepOptions.parse(options), parse_metrics(metrics), progress_dir, resume),
    )
    result = measure(model, tokenizer, config, windows=windows, stack=stack, model_name=model_name,
                     progress=progress, loss=loss)
    if progress_dir is not None and not result.summary["interrupted"]:
        (Path(progress_dir) / DROP_PROGRESS).unlink(missing_ok=True)
    result = with_proxy_statistics(result, config.options.bootstrap)
    # statistics from too little data say so (summary notes: printed by the CLI, in the report)
    result.summary["notes"] = [*result.summary.get("notes", []), *caveats(result.summary)]
    return result


def _with_progress_file(options: SweepOptions, metrics: Sequence[str], progress_dir, resume: bool) -> SweepOptions:
    """Point the drop sweep at ``progress_dir/drop_progress.jsonl``; a stale file is removed
    unless resuming."""
    if resume and progress_dir is None:
        raise DepthprobeError("--resume needs --out (the folder of the interrupted run)")
    if progress_dir is None or "drop" not in metrics:
        return options
    path = Path(progress_dir) / DROP_PROGRESS
    if path.exists() and not resume:
        path.unlink()
    return dataclasses.replace(options, drop=dataclasses.replace(options.drop, progress_file=str(path)))


def measure(model: torch.nn.Module, tokenizer, config: ProbeConfig, *, windows: Windows | None = None,
            stack: LayerStack | None = None, model_name: str | None = None, progress: bool = True,
            loss: bool | None = None) -> AnalysisResult:
    """The measurements of :func:`analyze` (main pass, sweeps, summary), without statistics."""
    stack = stack or LayerStack.from_model(model, config.layers_path)
    progress = progress and distributed.is_main()
    windows = windows if windows is not None else _windows(model, tokenizer, config)
    objective = objective_for(stack)
    log.info("analyze %s: %d blocks, metrics %s, %d windows x %d tokens of %s", type(model).__name__, len(stack),
             ",".join(config.metrics), windows.num_sequences, windows.seq_len, windows.source)
    if stack.device.type == "cuda":  # summary.json reports this run's CUDA peak
        torch.cuda.reset_peak_memory_stats(stack.device)
    # under torchrun each process measures its share of the windows; results are reduced
    with distributed.split_windows(windows) as local:
        with evaluating(model):
            main = _main_pass(stack, local, config, needs_loss(config.metrics) if loss is None else loss, progress)
        ctx = SweepContext(stack, local, objective, config.batch_size, config.options, main.base_loss,
                           main.window_nll, progress)
        log.info("main pass done (base loss %s)", None if main.base_loss is None else round(main.base_loss, 4))
        sweeps, interrupted = run_sweeps(ctx, config.metrics)
    layers = pd.DataFrame({"layer": np.arange(len(stack)),
                           **{k: np.asarray(v, float) for k, v in main.columns.items()},
                           **{k: np.asarray(v, float) for out in sweeps.values() for k, v in out.columns.items()}})
    summary = RunSummary.build(model, stack, windows, config, objective, main, sweeps, layers, interrupted,
                               model_name)
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
    """Run the requested sweeps in order; a Ctrl-C keeps those finished and names the one cut."""
    done: dict[str, SweepOutput] = {}
    for name in metrics:
        if name not in SWEEPS:
            continue
        t0 = time.perf_counter()
        try:
            out = SWEEPS[name](ctx)
        except KeyboardInterrupt:  # the caller saves what is finished and says how to resume
            return done, name
        out.seconds = out.seconds or (time.perf_counter() - t0)
        done[name] = out
    return done, None


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
    extra: dict = field(default_factory=dict)  # entries the sweeps add (e.g. drop_base_loss)
    nonfinite_weights: list[int] = field(default_factory=list)  # blocks holding NaN/inf weights

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**data, **self.extra}

    @classmethod
    def build(cls, model, stack: LayerStack, windows: Windows, config: ProbeConfig, objective: Objective,
              main: PassResult, sweeps: dict[str, SweepOutput], layers: pd.DataFrame, interrupted: str | None,
              model_name: str | None) -> RunSummary:
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
        bad_weights = nonfinite_weight_blocks(stack)
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
            num_sequences=windows.num_sequences, seq_len=windows.seq_len, num_tokens=int(windows.input_ids.numel()),
            text_source=windows.source, objective=objective.name, base_loss=main.base_loss,
            base_perplexity=math.exp(main.base_loss) if main.base_loss is not None else None,
            dtype=str(next(model.parameters()).dtype).replace("torch.", ""), device=str(stack.device),
            metrics=list(config.metrics), timings_s=timings, versions=versions(), notes=notes, nonfinite=nonfinite,
            interrupted=interrupted, config=config.to_dict(),
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
