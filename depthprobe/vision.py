"""`analyze_images`: per-block diagnostics of an image classifier, in the same table and report.

The flow is the text flow's with images in place of token windows: find the residual blocks
(:class:`~depthprobe.model.vision.VisionStack`), one hooked pass (+ backward for ``grad``),
then the drop and lens sweeps, linear probes (``probe``) and response maps (``response``,
CNNs with boxes). Metric definitions, with each spatial position of a feature map a token:
:mod:`depthprobe.probes.vision_pass`, :mod:`depthprobe.probes.linear_probe`,
:mod:`depthprobe.probes.response_maps`.

Example:
    >>> model = load_vision_model("./my-resnet")                                   # doctest: +SKIP
    >>> images = load_images("digits", image_size=32)                               # doctest: +SKIP
    >>> result = analyze_images(model, images, metrics="angular,grad,drop,probe")   # doctest: +SKIP
    >>> result.layers[["layer", "drop_delta_loss", "probe_accuracy"]]              # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from depthprobe.config import data_free, parse_metrics
from depthprobe.errors import DepthprobeError
from depthprobe.images import ImageSet
from depthprobe.model.vision import VISION_TYPES, VisionStack
from depthprobe.probes.linear_probe import probe_layers
from depthprobe.probes.response_maps import baseline_scores, localization_scores, response_maps
from depthprobe.probes.vision_pass import (
    VisionPass,
    drop_columns,
    image_objective,
    lens_column,
    run_vision_pass,
)
from depthprobe.probes.weight_spectra import spectra_sweep
from depthprobe.results import AnalysisResult

__all__ = ["DEFAULT_VISION_METRICS", "VISION_METRICS", "analyze_images", "is_vision_source", "load_vision_model"]

VISION_METRICS = ("angular", "variance", "grad", "drop", "lens", "probe", "response", "spectra")
DEFAULT_VISION_METRICS = ("angular", "variance", "grad", "drop", "lens")


def is_vision_source(source: str | Path) -> bool:
    """A vision-net checkpoint (``.pt``) or a folder whose config names an image model."""
    path = Path(source)
    if path.is_file():
        return path.suffix == ".pt"
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    archs = data.get("architectures") or []
    return data.get("model_type") in VISION_TYPES or any("ImageClassification" in a for a in archs)


def load_vision_model(source: str | Path, trust_remote_code: bool = False) -> torch.nn.Module:
    """A depthprobe vision net (``.pt``) or a transformers image classifier (folder or hub id)."""
    path = Path(source)
    if path.suffix == ".pt":
        from depthprobe.model.vision_net import load_vision_net

        if not path.is_file():
            raise DepthprobeError(f"{source}: no such checkpoint")
        return load_vision_net(path)
    from transformers import AutoModelForImageClassification

    try:
        model = AutoModelForImageClassification.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DepthprobeError(f"cannot load the image classifier {source}: {first}") from None
    return model.eval()


def parse_vision_metrics(metrics: str | Sequence[str]) -> tuple[str, ...]:
    names = parse_metrics(metrics)
    unknown = [m for m in names if m not in VISION_METRICS]
    if unknown:
        raise DepthprobeError(f"unknown metric(s) for an image model: {', '.join(unknown)}; choose from "
                              f"{', '.join(VISION_METRICS)}")
    return names


def check_images(stack: VisionStack, images: ImageSet) -> None:
    """The images fit the model: outputs vs classes/attributes, the size a ViT was built for."""
    with torch.no_grad():
        outputs = stack.logits(images.pixels[:1].to(stack.device)).shape[-1]
    if images.multilabel and outputs != len(images.names):
        raise DepthprobeError(f"the model has {outputs} outputs but --attributes has {len(images.names)} columns; "
                              "pass an attribute file with one column per output")
    if not images.multilabel and outputs < len(images.names):
        raise DepthprobeError(f"the model has {outputs} outputs but the images have {len(images.names)} classes")


@dataclass
class _Run:
    """One image analysis in progress: what the steps read and the columns, notes and tables they add."""

    stack: VisionStack
    images: ImageSet
    metrics: tuple[str, ...]
    batch_size: int
    progress: bool
    main: VisionPass | None = None
    columns: dict[str, list] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def analyze_images(model: torch.nn.Module, images: ImageSet | None, *,
                   metrics: str | Sequence[str] = DEFAULT_VISION_METRICS, batch_size: int = 64,
                   layers_path: str | None = None, model_name: str | None = None,
                   progress: bool = True) -> AnalysisResult:
    """Measure every residual block of an image classifier on ``images``.

    Returns the same :class:`~depthprobe.results.AnalysisResult` as text models: ``layers``
    (one row per block: ``stage``, ``downsample`` and the metric columns), ``summary`` and,
    with ``probe``, the per-target table ``probe`` (with ``response``, ``response_baselines``).
    ``spectra`` (Conv2d and Linear weights as WeightWatcher treats them) needs no images:
    with it alone, ``images`` may be None.
    """
    model.eval()
    stack = VisionStack.from_model(model, layers_path)
    names = parse_vision_metrics(metrics)
    weights = spectra_sweep(stack, progress) if "spectra" in names else None  # data-free, first: fails fast
    if images is None:
        if not data_free(names):
            raise DepthprobeError("an image model needs images for these metrics: pass --images digits|FOLDER")
        return _weights_only(model, stack, weights, model_name)
    stack.trace(images.pixels[:1].to(stack.device))
    check_images(stack, images)
    run = _Run(stack, images, names, batch_size, progress)
    t0 = time.perf_counter()
    run.main = run_vision_pass(stack, images, run.metrics, batch_size, progress, keep_features="probe" in run.metrics)
    run.timings["main_pass"] = time.perf_counter() - t0
    run.columns = {"stage": [b.stage for b in stack.blocks], "downsample": [int(b.downsample) for b in stack.blocks],
                   **{k: v for k, v in run.main.columns.items() if _asked(k, run.metrics)}}
    for name, step in (("drop", _drop), ("lens", _lens), ("probe", _probe), ("response", _response)):
        if name in run.metrics:
            t0 = time.perf_counter()
            step(run)
            run.timings[name] = time.perf_counter() - t0
    if weights is not None:
        run.columns.update(weights.columns)
        run.tables.update(weights.tables)
        run.timings["spectra"] = weights.seconds
        run.notes += [f"{column}: {why}" for column, why in weights.not_applicable.items()]
    layers = pd.DataFrame({"layer": np.arange(len(stack)), **{k: np.asarray(v, float) for k, v in run.columns.items()}})
    summary = _summary(model, run, layers, model_name, skip=weights.not_applicable if weights else {})
    return AnalysisResult(layers=layers, summary=summary, tables=run.tables)


def _weights_only(model, stack: VisionStack, weights, model_name: str | None) -> AnalysisResult:
    """A data-free image-model result (``--metrics spectra`` without images)."""
    from depthprobe.analysis import versions

    layers = pd.DataFrame({"layer": np.arange(len(stack)), "stage": [b.stage for b in stack.blocks],
                           **{k: np.asarray(v, float) for k, v in weights.columns.items()}})
    config = getattr(model, "config", None)
    summary = {
        "model": model_name or getattr(config, "_name_or_path", None) or type(model).__name__,
        "architecture": type(model).__name__, "family": stack.family, "blocks_path": stack.blocks_path,
        "norm_placement": "unknown", "num_layers": len(stack),
        "num_parameters": int(sum(p.numel() for p in model.parameters())), "num_sequences": 0, "seq_len": 0,
        "num_tokens": 0, "text_source": "none (data-free metrics)", "objective": "none", "base_loss": None,
        "base_perplexity": None, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(stack.device), "metrics": ["spectra"], "timings_s": {"spectra": weights.seconds},
        "versions": versions(), "notes": [f"{column}: {why}" for column, why in weights.not_applicable.items()],
        "nonfinite": {}, "interrupted": None, "config": {"metrics": ["spectra"]}, "modality": "image",
        **weights.summary,
        "blocks": [{"name": b.name, "stage": b.stage, "shortcut": b.shortcut_kind} for b in stack.blocks],
    }
    return AnalysisResult(layers=layers, summary=summary, tables=dict(weights.tables))


def _asked(column: str, metrics: Sequence[str]) -> bool:
    group = {"angular_distance": "angular", "block_influence": "angular", "grad_norm": "grad"}.get(column, "variance")
    return group in metrics


def _drop(run: _Run) -> None:
    run.columns.update(drop_columns(run.stack, run.images, run.main, run.batch_size, run.progress))
    none = [i for i, b in enumerate(run.stack.blocks) if b.shortcut is None]
    if none:
        run.notes.append(f"drop_delta_loss: not applicable to block(s) {', '.join(map(str, none))}: they change the "
                         "feature shape and have no shortcut to replace them by")


def _lens(run: _Run) -> None:
    lens = run.columns["logit_lens_loss"] = lens_column(run.stack, run.images, run.batch_size, run.progress)
    missing = [i for i, v in enumerate(lens) if not math.isfinite(v)]
    if missing:
        run.notes.append(f"logit_lens_loss: not applicable to block(s) {', '.join(map(str, missing))}: a later "
                         "block changes the feature shape, so the pooling and head cannot read their output")


def _probe(run: _Run) -> None:
    images = run.images
    columns, run.tables["probe"] = probe_layers(run.main.features, images.targets.numpy(), images.names,
                                                images.multilabel)
    run.columns.update(columns)


def _response(run: _Run) -> None:
    stack, images = run.stack, run.images
    if stack.layout != "maps":
        run.notes.append("response maps: not applicable: the blocks output tokens, not spatial feature maps")
        return
    if images.boxes is None:
        run.notes.append("response maps: not scored: no list_bbox_celeba.txt beside --attributes")
        return
    size = images.pixels.shape[-1]
    maps = response_maps(stack, images, list(range(len(stack))), run.batch_size)
    scores = [localization_scores(maps[i], images.boxes, size) for i in range(len(stack))]
    for key in ("pointing_accuracy", "response_iou"):
        run.columns[key] = [s[key] for s in scores]
    base = baseline_scores(images.boxes, size)
    run.tables["response_baselines"] = pd.DataFrame([{"baseline": k, **v} for k, v in base.items()])


def _summary(model, run: _Run, layers: pd.DataFrame, model_name: str | None, skip: dict | None = None) -> dict:
    from depthprobe.analysis import nonfinite_layers, nonfinite_note, versions

    stack, images, main, notes = run.stack, run.images, run.main, run.notes
    skip = {**{c: "not applicable" for c in ("drop_delta_loss", "drop_delta_error", "logit_lens_loss")}, **(skip or {})}
    nonfinite = nonfinite_layers(layers, skip=skip)
    if nonfinite:
        notes.append(nonfinite_note(nonfinite))
    positions = int(np.prod(images.pixels.shape[2:]))
    config = getattr(model, "config", None)
    size = int(images.pixels.shape[-1])
    return {
        "model": model_name or getattr(config, "_name_or_path", None) or type(model).__name__,
        "architecture": type(model).__name__, "family": stack.family, "blocks_path": stack.blocks_path,
        "norm_placement": "unknown", "num_layers": len(stack),
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "num_sequences": len(images), "seq_len": positions, "num_tokens": len(images) * positions,
        "text_source": images.source, "objective": image_objective(stack, images).name,
        "base_loss": main.base_loss, "base_perplexity": None, "base_error": main.base_error,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "device": str(stack.device),
        "metrics": list(run.metrics), "timings_s": run.timings, "versions": versions(), "notes": notes,
        "nonfinite": nonfinite, "interrupted": None,
        "config": {"metrics": list(run.metrics), "num_images": len(images), "image_size": size,
                   "batch_size": run.batch_size, "layout": stack.layout},
        "modality": "image", "num_images": len(images), "image_size": size, "targets": list(images.names),
        "blocks": [{"name": b.name, "stage": b.stage, "shortcut": b.shortcut_kind, "downsample": b.downsample}
                   for b in stack.blocks],
    }
