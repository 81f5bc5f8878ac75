"""Speed of a (pruned) model: prefill and decode tokens per second, peak memory.

- **prefill**: one forward over ``B`` prompts of ``T`` tokens that also builds the KV cache;
  ``prefill_tokens_per_s = B*T / seconds``.
- **decode**: greedy generation with the KV cache, ``G`` steps of one token per prompt
  after the prefill (argmax of the last logits fed back, the cache reused);
  ``decode_tokens_per_s = B*G / seconds`` of those steps only.
- **peak memory**: on CUDA ``torch.cuda.max_memory_allocated`` during the run (weights
  included); on CPU the process's peak resident memory sampled every 2 ms during the run
  minus the resident memory before it, plus the weights' bytes.

Each configuration is timed ``repeats`` times after one warm-up and the median kept. Models
are measured in alternation per configuration (A, B, A, B, ...) so machine load drifts hit
all of them alike; compare ratios from one run, not numbers across runs.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import statistics
import threading
import time
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from depthprobe.errors import DepthprobeError
from depthprobe.model.load import load_model
from depthprobe.probes.offload import return_freed_memory

log = logging.getLogger(__name__)

BENCH_COLUMNS = ["model", "num_layers", "device", "dtype", "batch_size", "prompt_len", "new_tokens",
                 "prefill_s", "prefill_tokens_per_s", "decode_s", "decode_tokens_per_s", "peak_memory_mb",
                 "weights_mb"]


@dataclass(frozen=True)
class BenchConfig:
    batch_sizes: tuple[int, ...] = (1, 4)
    prompt_lens: tuple[int, ...] = (128, 512)
    new_tokens: int = 32  # decode steps per prompt
    repeats: int = 3  # timed runs per configuration; the median is kept
    seed: int = 0

    def __post_init__(self):
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise DepthprobeError(f"--batch-sizes must be positive integers (got {self.batch_sizes})")
        if not self.prompt_lens or min(self.prompt_lens) < 1:
            raise DepthprobeError(f"--prompt-lens must be positive integers (got {self.prompt_lens})")
        if self.new_tokens < 1 or self.repeats < 1:
            raise DepthprobeError(f"--new-tokens and --repeats must be at least 1 (got {self.new_tokens}, "
                                  f"{self.repeats})")


def fit_config(config: BenchConfig, model) -> BenchConfig:
    """``config`` with the prompt lengths that fit the model's positions (at least one:
    half of what is left after the decode steps)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return config
    lens = tuple(t for t in config.prompt_lens if t + config.new_tokens <= limit)
    return dataclasses.replace(config, prompt_lens=lens or (max(1, (limit - config.new_tokens) // 2),))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_of(out):
    """The KV cache of a forward's output: ``cache`` in newer transformers (reading
    ``past_key_values`` there warns of its removal), ``past_key_values`` before."""
    return out["cache"] if "cache" in out else out.past_key_values


def _cache_argument(model) -> str:
    """The forward's name for the KV cache argument (``cache``, or ``past_key_values`` in older
    transformers and models that keep it)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor):
    """One forward over the prompts that fills the KV cache ``-> (cache, next token (B, 1))``."""
    out = model(input_ids=input_ids, use_cache=True)
    return _cache_of(out), out.logits[:, -1].argmax(-1, keepdim=True)


@torch.no_grad()
def decode(model, cache, token: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding with the KV cache: ``steps`` one-token forwards ``-> (B, steps)`` ids."""
    produced = []
    name = _cache_argument(model)
    for _ in range(steps):
        out = model(input_ids=token, use_cache=True, **{name: cache})
        cache = _cache_of(out)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        produced.append(token)
    return torch.cat(produced, 1)


class PeakMemory:
    """Peak memory of the code in the ``with`` block, in MB (see module docs)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            # freed heap pages stay resident (glibc keeps them), so an earlier run's transients
            # would hide in the baseline and the sampled peak read 0: hand them back first
            return_freed_memory()
            self._base = self._peak = _rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes())
            self.peak_mb = (self._peak - self._base) / 2**20
        return False


def _rss_bytes() -> int:
    """Resident memory of this process (Linux ``/proc/self/statm``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


try:
    _PAGE = os.sysconf("SC_PAGE_SIZE")
except (AttributeError, ValueError, OSError):
    _PAGE = 4096


def weights_mb(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def _num_layers(model) -> int | None:
    value = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return value if isinstance(value, int) else None


def _time_once(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float, float]:
    """(prefill seconds, decode seconds, peak MB) of one prefill + greedy decode."""
    device = ids.device
    with PeakMemory(device) as mem:
        _sync(device)
        t0 = time.perf_counter()
        cache, token = prefill(model, ids)
        _sync(device)
        t1 = time.perf_counter()
        decode(model, cache, token, new_tokens)
        _sync(device)
        t2 = time.perf_counter()
        del cache
    return t1 - t0, t2 - t1, mem.peak_mb


def bench(models: dict[str, torch.nn.Module], config: BenchConfig = BenchConfig(),
          progress: bool = True) -> pd.DataFrame:
    """Prefill and decode tokens/s and peak memory of each model (``label -> model``), one row
    per model, batch size and prompt length (columns ``BENCH_COLUMNS``).

    Example:
        >>> full, _ = depthprobe.load_model("smollm2"); pruned, _ = depthprobe.load_model("runs/smol-24")  # doctest: +SKIP
        >>> speedups(bench({"full": full, "pruned": pruned}))                                  # doctest: +SKIP
    """
    if not models:
        raise DepthprobeError("bench needs at least one model")
    for label, model in models.items():
        model.eval()
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(limit, int) and max(config.prompt_lens) + config.new_tokens > limit:
            raise DepthprobeError(f"{label} takes {limit} positions; lower --prompt-lens / --new-tokens")
    vocab = min(m.get_output_embeddings().weight.shape[0] for m in models.values())
    generator = torch.Generator().manual_seed(config.seed)
    shapes = [(b, t) for b in config.batch_sizes for t in config.prompt_lens]
    bar = tqdm(total=len(shapes) * (config.repeats + 1) * len(models), desc="bench", disable=not progress,
               leave=False)
    rows = []
    for batch, length in shapes:
        ids = torch.randint(0, vocab, (batch, length), generator=generator)
        runs: dict[str, list[tuple[float, float, float]]] = {label: [] for label in models}
        for repeat in range(config.repeats + 1):  # the first round warms up and is not kept
            for label, model in models.items():
                timing = _time_once(model, ids.to(next(model.parameters()).device), config.new_tokens)
                if repeat:
                    runs[label].append(timing)
                bar.update()
        for label, model in models.items():
            rows.append(_row(label, model, batch, length, config.new_tokens, runs[label]))
    bar.close()
    return pd.DataFrame(rows, columns=BENCH_COLUMNS)


def _row(label, model, batch, length, new_tokens, runs) -> dict:
    prefill_s = statistics.median(r[0] for r in runs)
    decode_s = statistics.median(r[1] for r in runs)
    first = next(model.parameters())
    return {"model": label, "num_layers": _num_layers(model), "device": str(first.device),
            "dtype": str(first.dtype).removeprefix("torch."), "batch_size": batch, "prompt_len": length,
            "new_tokens": new_tokens, "prefill_s": prefill_s, "prefill_tokens_per_s": batch * length / prefill_s,
            "decode_s": decode_s, "decode_tokens_per_s": batch * new_tokens / decode_s,
            "peak_memory_mb": max(r[2] for r in runs) + (0.0 if first.device.type == "cuda" else weights_mb(model)),
            "weights_mb": weights_mb(model)}


def speedups(table: pd.DataFrame) -> pd.DataFrame:
    """Each model against the first at the same batch size and prompt length:
    ``prefill_speedup``, ``decode_speedup`` (tokens/s ratios) and ``ideal_speedup``
    (first model's blocks / this model's blocks, what removing blocks could give at most
    if nothing but the blocks cost time)."""
    reference = table["model"].iloc[0]
    keys = ["batch_size", "prompt_len"]
    ref = table[table["model"] == reference].set_index(keys)
    rows = []
    for row in table[table["model"] != reference].itertuples(index=False):
        base = ref.loc[(row.batch_size, row.prompt_len)]
        rows.append({"model": row.model, "reference": reference, "batch_size": row.batch_size,
                     "prompt_len": row.prompt_len,
                     "prefill_speedup": row.prefill_tokens_per_s / base["prefill_tokens_per_s"],
                     "decode_speedup": row.decode_tokens_per_s / base["decode_tokens_per_s"],
                     "ideal_speedup": (base["num_layers"] / row.num_layers
                                       if base["num_layers"] and row.num_layers else float("nan")),
                     "memory_ratio": row.peak_memory_mb / base["peak_memory_mb"]})
    return pd.DataFrame(rows, columns=["model", "reference", "batch_size", "prompt_len", "prefill_speedup",
                                       "decode_speedup", "ideal_speedup", "memory_ratio"])


def bench_sources(sources: list[str], config: BenchConfig = BenchConfig(), progress: bool = True,
                  **load_kwargs) -> pd.DataFrame:
    """Load every model (``depthprobe.load_model``; all stay loaded so they alternate) and bench."""
    models = {}
    for source in sources:
        label = source if source not in models else f"{source} ({len(models)})"
        models[label] = load_model(source, **load_kwargs)[0]
    return bench(models, config, progress)
