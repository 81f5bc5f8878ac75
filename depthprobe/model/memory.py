"""A memory plan made before any weight is read: will this analysis fit, and in which dtype?

The plan comes from the model's config and the checkpoint's safetensors headers (parameter
counts, stored dtype and size: :mod:`depthprobe.model.shape`; no weight read, no module tree
built where headers exist) and the workload (metrics, batch tokens). What the machine offers
is probed in :mod:`depthprobe.model.system`; offload refusals live in
:mod:`depthprobe.model.offload`. It estimates, in bytes:

- ``weights``: parameters in the compute dtype. On a CPU, safetensors weights loaded in
  their stored dtype stay memory-mapped (file-backed pages the kernel can drop and re-read),
  so they are counted apart from anonymous memory; an up-cast copy is anonymous.
- ``gradients``: with several batches, the running sum of every block parameter's gradient
  (``grad``), in the compute dtype; with one batch, one weight matrix's (each gradient is
  reduced to its norm and freed as the backward produces it).
- ``activations``: what the backward keeps per token and block (about ``10 d + 5 I``
  values for a gated-MLP block, ``d`` the width and ``I`` the MLP width, plus ``16 d`` bytes
  of the norms' float32 copies in a 16-bit dtype) or, forward only, one block's transient
  tensors, plus the logits in float32 for the loss.
- ``hooks``: the float64 unit vectors of every residual state (``angular``), one logit
  tensor per block for the logit lens.
- ``states``: the drop sweep's cached block inputs, ``(L + 1) B T d`` values.

Offloaded (``device="offload"``), analyze runs layer-major (:mod:`depthprobe.probes.layer_major`):
every window's states ``x_0..x_L`` are kept (``(L + 2) N T d`` values with the backward's
upstream gradient, in RAM up to a quarter of what is available, then spilled to a file), and
the backward runs one block at a time, so gradients and activations are one block's.

peak = anonymous weights + max(runtime + max(main pass, drop sweep), the loading peak),
compared with the memory
available (``MemAvailable`` of ``/proc/meminfo``, the cgroup limit if lower, and each GPU's
free memory).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from depthprobe.config import ProbeConfig
from depthprobe.errors import DepthprobeError
from depthprobe.model.offload import check_offload_supports, offloaded_modules
from depthprobe.model.shape import ModelShape, config_dtype, model_shape, safetensors_headers
from depthprobe.model.system import available_memory, parse_max_memory

log = logging.getLogger(__name__)

GIB = 1024**3
#: interpreter, torch, transformers and allocator slack (measured: ~0.17 GB after import,
#: ~0.4 GB after the first passes)
RUNTIME_BYTES = int(0.45 * GIB)
#: transformers' loading of a safetensors checkpoint: the anonymous peak while it loads,
#: weights aside (measured 0.92-1.08 GiB on Llama shapes of 2 to 32 blocks, bfloat16 mapped)
LOAD_PEAK_BYTES = int(1.0 * GIB)
#: the share of available memory a plan may use; the rest absorbs estimate error and others
HEADROOM = 0.9


def batch_tokens(config: ProbeConfig) -> int:
    """Tokens of one forward pass: ``min(batch_size, num_sequences) * seq_len``."""
    return min(config.batch_size, config.num_sequences) * config.seq_len


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated bytes of each part of a run and whether it fits; see the module docs."""

    dtype: torch.dtype
    device: str  # "cpu", "cuda:0", or "offload" when accelerate places the weights
    shape: ModelShape
    workload: ProbeConfig
    weights: int
    mapped: bool  # weights stay memory-mapped (not anonymous memory)
    gradients: int
    activations: int
    hooks: int
    states: int
    available: dict[str, int] = field(default_factory=dict)
    budget: int | None = None  # --max-memory's share for this device, when given

    @property
    def layer_major(self) -> bool:
        """Offloaded runs go layer-major: the main pass holds the cached states too."""
        return self.device == "offload"

    @property
    def main_pass(self) -> int:
        return self.gradients + self.activations + self.hooks + (self.states if self.layer_major else 0)

    @property
    def peak_anonymous(self) -> int:
        """Peak of the process's anonymous (non file-backed) memory."""
        anon_weights = 0 if self.mapped else self.weights
        running = RUNTIME_BYTES + max(self.main_pass, self.states + self.activations_forward)
        return anon_weights + max(running, LOAD_PEAK_BYTES)

    @property
    def activations_forward(self) -> int:
        return self.activations if "grad" not in self.workload.metrics else _forward_transient(self)

    @property
    def peak_resident(self) -> int:
        """Anonymous peak plus the memory-mapped weights (what runs without re-reading disk)."""
        return self.peak_anonymous + (self.weights if self.mapped else 0)

    @property
    def limit(self) -> int:
        avail = self.available.get("cpu" if self.device == "offload" else self.device)
        if self.budget is not None and self.device != "offload":
            return self.budget if avail is None else min(self.budget, avail)
        return int(HEADROOM * avail) if avail is not None else 1 << 62  # unknown (mps): do not refuse

    @property
    def fits(self) -> bool:
        """Everything resident, mapped weights included, within the available memory."""
        return self.peak_resident <= self.limit

    @property
    def runs(self) -> bool:
        """Anonymous memory fits: it completes, re-reading mapped weights from disk if needed."""
        return self.peak_anonymous <= self.limit

    def rows(self) -> list[tuple[str, int]]:
        weights = "weights (memory-mapped)" if self.mapped else "weights"
        return [
            (weights, self.weights),
            ("gradients", self.gradients),
            ("activations", self.activations),
            ("hooks (angular units, lens logits)", self.hooks),
            ("cached block states" if self.layer_major else "drop sweep cached states", self.states),
            ("runtime", RUNTIME_BYTES),
            ("peak, anonymous memory", self.peak_anonymous),
            ("peak, resident (with mapped weights)", self.peak_resident),
        ]

    def format(self) -> str:
        """Multi-line text for ``--dry-run`` and ``-v``."""
        s, w = self.shape, self.workload
        head = (
            f"memory plan: {s.num_parameters / 1e9:.2f} B parameters ({s.num_layers} blocks, d={s.hidden}) "
            f"in {_name(self.dtype)} on {self.device} (checkpoint {_name(s.checkpoint_dtype)}); "
            f"metrics {','.join(w.metrics)}; {batch_tokens(w)} tokens per forward"
        )
        lines = [head] + [f"  {name:<38s} {gb(v):>9s}" for name, v in self.rows()]
        for dev, avail in self.available.items():
            lines.append(f"  {'available on ' + dev:<38s} {gb(avail):>9s}")
        if self.budget is not None:
            lines.append(f"  {'--max-memory for ' + self.device:<38s} {gb(self.budget):>9s}")
        verdict = "fits" if self.fits else ("runs, re-reading mapped weights from disk (slow)" if self.runs
                                            else "does not fit")
        lines.append(f"  verdict: {verdict}")
        return "\n".join(lines)


def gb(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _forward_transient(plan: MemoryPlan) -> int:
    """One block's forward temporaries plus the float32 logits and their log-softmax."""
    s, tokens, size = plan.shape, batch_tokens(plan.workload), _bytes(plan.dtype)
    return tokens * ((4 * s.hidden + 3 * s.intermediate) * size + s.vocab * (size + 8))


def state_budget(available: dict[str, int]) -> int | None:
    """Bytes of cached streams layer-major execution keeps in RAM before spilling to a file:
    a quarter of the CPU memory ``available`` (None when unknown)."""
    return available["cpu"] // 4 if "cpu" in available else None


def _gradient_bytes(shape: ModelShape, workload: ProbeConfig, size: int) -> int:
    """Gradients alive at once: with several batches the running sums of every block
    parameter's gradient; with one, each gradient is reduced and freed as the backward
    produces it, so about one weight matrix (``d x I``) and a float64 chunk of it."""
    if workload.num_sequences > workload.batch_size:
        return shape.block_parameters * size
    return shape.hidden * shape.intermediate * size + (1 << 21) * 8


def estimate(shape: ModelShape, dtype: torch.dtype, workload: ProbeConfig, device: str = "cpu",
             available: dict[str, int] | None = None, budget: int | None = None) -> MemoryPlan:
    """The plan for ``shape`` run in ``dtype`` on ``device`` (formulas in the module docs)."""
    size = _bytes(dtype)
    metrics, tokens = set(workload.metrics), batch_tokens(workload)
    d, inter, layers = shape.hidden, shape.intermediate, shape.num_layers
    # CPU-resident weights of the stored dtype stay views of the memory-mapped files
    mapped = device in ("cpu", "offload") and shape.safetensors and dtype == shape.checkpoint_dtype
    grad = "grad" in metrics or "attribution" in metrics
    weights = shape.num_parameters * size
    if device == "offload":  # accelerate keeps the --max-memory share resident, one block more in use
        block = shape.block_parameters // max(layers, 1) * size
        weights = min(weights, (budget if budget is not None else weights) + block)
    plan = MemoryPlan(
        dtype=dtype, device=device, shape=shape, workload=workload,
        weights=weights, mapped=mapped,
        gradients=_gradient_bytes(shape, workload, size) if "grad" in metrics else 0,
        activations=0, hooks=0,
        states=(layers + 1) * tokens * d * size if "drop" in metrics else 0,
        available=dict(available or {}), budget=budget,
    )
    backward_blocks = layers
    if plan.layer_major:  # one block's gradients and re-run at a time; every window's states kept
        all_states = (layers + 2) * workload.num_sequences * workload.seq_len * d * size
        in_ram = state_budget(available or {}) or all_states
        backward_blocks = 1
        plan = replace(plan, gradients=shape.block_parameters // max(layers, 1) * size if "grad" in metrics else 0,
                       states=max(plan.states, min(all_states, in_ram)))
    norm_copies = 16 * d if size < 4 else 0  # RMSNorm/LayerNorm compute (and save) in float32
    per_token_block = (10 * d + 5 * inter) * size + norm_copies
    backward = tokens * backward_blocks * per_token_block + tokens * shape.vocab * (size + 12)
    hooks = (layers + 1) * tokens * d * 8 if "angular" in metrics else 0
    hooks += tokens * shape.vocab * (size + 8) if "lens" in metrics else 0
    activations = backward if grad else _forward_transient(plan)
    return replace(plan, activations=activations, hooks=hooks)


# ---------------------------------------------------------------------------- decisions
def fallback_dtype(checkpoint: torch.dtype, device: str) -> torch.dtype:
    """The dtype to use when float32 does not fit: the checkpoint's own, but bfloat16 on a
    CPU for float16 (CPU float16 kernels are slow and overflow-prone), and half precision
    for a float32 checkpoint (GGUF de-quantized)."""
    if checkpoint == torch.float16 and device == "cpu":
        return torch.bfloat16
    if checkpoint in (torch.float32, torch.float64):
        return torch.bfloat16 if device == "cpu" else torch.float16
    return checkpoint


def choose_dtype(shape: ModelShape, workload: ProbeConfig, device: str, available: dict[str, int],
                 budget: int | None = None) -> tuple[MemoryPlan, str | None]:
    """``--dtype auto``: the plan in float32 when it fits, else in the fallback dtype, and
    the one-line note saying so (None when float32 was kept). Raises the refusal when
    nothing fits."""
    full = estimate(shape, torch.float32, workload, device, available, budget)
    # offloaded: float32 only when no weight would go to disk (an up-cast copy of the rest
    # would be written there and read back for every block run)
    on_disk = (device == "offload" and shape.checkpoint_dtype != torch.float32
               and shape.num_parameters * 4 > (budget if budget is not None else full.limit))
    if full.fits and not on_disk:
        return full, None
    kind = device.split(":")[0]
    if kind == "offload":  # accelerate computes on the GPU when there is one
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    low_dtype = fallback_dtype(shape.checkpoint_dtype, kind)
    low = estimate(shape, low_dtype, workload, device, available, budget)
    if not low.runs:
        raise DepthprobeError(refusal(low))
    why = (f"float32 weights ({gb(shape.num_parameters * 4)}) would be offloaded to disk" if on_disk
           else f"float32 needs {gb(full.peak_resident)} and {gb(full.limit)} is usable on {device}")
    note = f"{why}: loading in {_name(low_dtype)} (pass --dtype float32 to insist)"
    if not low.fits:
        note += "; the weights stay memory-mapped and parts are re-read from disk, which is slow"
    return low, note


def refusal(plan: MemoryPlan) -> str:
    """One line: what does not fit, and the options that would."""
    where = "cpu" if plan.device == "offload" else plan.device
    options = []
    if plan.device != "offload":
        options.append(f"--max-memory cpu:{max(plan.limit // GIB - 1, 1)}GiB --offload-folder DIR")
    heavy = [m for m in plan.workload.metrics if m in ("grad", "attribution")]
    if heavy:
        lighter = estimate(plan.shape, plan.dtype, replace(plan.workload, metrics=tuple(
            m for m in plan.workload.metrics if m not in heavy)), plan.device, plan.available, plan.budget)
        if lighter.runs:
            options.append(f"--metrics without {','.join(heavy)} ({gb(lighter.peak_anonymous)})")
    if plan.workload.batch_size > 1:
        options.append("a smaller --batch-size")
    if where == "cpu":
        options.append("a GPU (--device cuda)")
    return (
        f"this run needs about {gb(plan.peak_anonymous)} of memory in {_name(plan.dtype)} "
        f"({gb(plan.gradients)} of gradients) and {gb(plan.limit)} is usable on {where}; "
        f"it would be killed, so nothing was loaded. Options: {'; '.join(options)}"
    )


def make_plan(source: str, gguf_file: str | None = None, *, dtype: torch.dtype | str = "auto",
              device: torch.device | str | None = "cpu", device_map=None, max_memory: dict | None = None,
              workload: ProbeConfig | None = None, config_kwargs: dict | None = None
              ) -> tuple[MemoryPlan, str | None]:
    """The plan for loading ``source`` (a folder, hub id, or folder + ``gguf_file``) and the
    one-line dtype note of ``--dtype auto``. ``device`` None means accelerate places the
    weights (``device_map``). Raises the one-line refusal when the run cannot fit."""
    from transformers import AutoConfig

    kwargs = dict(config_kwargs or {})
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    config = AutoConfig.from_pretrained(source, **kwargs)
    shape = model_shape(config, source if Path(source).is_dir() else None, gguf=bool(gguf_file))
    where = "offload" if device_map is not None else _device_key(device)
    budget = None
    if max_memory:
        from accelerate.utils import convert_file_size_to_int

        key = "cpu" if where in ("cpu", "offload") else int(where.split(":")[1] if ":" in where else 0)
        if key in max_memory:
            budget = convert_file_size_to_int(max_memory[key])
    workload = workload or ProbeConfig()
    available = available_memory()
    if dtype == "auto":
        return choose_dtype(shape, workload, where, available, budget)
    plan = estimate(shape, dtype, workload, where, available, budget)
    if not plan.runs:
        raise DepthprobeError(refusal(plan))
    return plan, None


def _device_key(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{device.index or 0}"
    return device.type


def metrics_of(opts_metrics: str | Sequence[str] | None) -> tuple[str, ...]:
    if opts_metrics is None:
        return ProbeConfig().metrics
    if isinstance(opts_metrics, str):
        return tuple(m.strip() for m in opts_metrics.split(",") if m.strip())
    return tuple(opts_metrics)


# these moved to their own modules; kept importable from here (the plan's public face)
__all__ = ["GIB", "MemoryPlan", "ModelShape", "batch_tokens", "available_memory", "check_offload_supports",
           "choose_dtype", "config_dtype", "estimate", "make_plan", "metrics_of", "model_shape", "offloaded_modules",
           "parse_max_memory", "refusal", "safetensors_headers", "state_budget"]


def __getattr__(name: str):
    """``Workload`` became :class:`depthprobe.config.ProbeConfig` (same fields); kept one release."""
    if name == "Workload":
        import warnings

        warnings.warn("depthprobe.model.memory.Workload is depthprobe.config.ProbeConfig now", DeprecationWarning,
                      stacklevel=2)
        return ProbeConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
