"""``shrink --target-speedup``: speed measured with ``evaluate.bench``, never estimated.

The search still ranks by damage per parameter; the parameters left in the blocks only say
when a measurement is worth making: once the ideal speedup (block parameters before / now)
reaches the target, the model as it is now is benched after every step, against the
original benched at the start in the same process, and the search stops when the measured
tokens/s ratio reaches the target. The exported folder is benched again after it is saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from depthprobe.errors import DepthprobeError
from depthprobe.evaluate.bench import BenchConfig, bench, fit_config
from depthprobe.prune.units import ShrinkState, count_params

#: the bench shrink runs at each check: small, a few repeats (the median is kept)
SHRINK_BENCH = BenchConfig(batch_sizes=(1,), prompt_lens=(64,), new_tokens=16, repeats=3)


def tokens_per_s(model: nn.Module, on: str, config: BenchConfig = SHRINK_BENCH) -> float:
    """Mean ``prefill`` or ``decode`` tokens/s of ``model`` over the bench's shapes."""
    try:
        table = bench({"model": model}, fit_config(config, model), progress=False)
    except DepthprobeError:
        raise
    except Exception as exc:  # noqa: BLE001 - a model that cannot prefill / decode with a cache
        raise DepthprobeError(f"--target-speedup: speed cannot be measured on this model ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); use --target-params") from exc
    return float(table[f"{on}_tokens_per_s"].mean())


@dataclass
class SpeedTarget:
    """Stops the search once the model's measured speed is ``target`` times the original's."""

    target: float
    on: str  # prefill | decode
    reference: float = 0.0  # the original's tokens/s
    block_params: int = 0
    measured: dict[int, float] = field(default_factory=dict)  # step -> tokens/s

    def start(self, state: ShrinkState) -> None:
        self.reference = tokens_per_s(state.model, self.on)
        self.block_params = sum(count_params(b) for b in state.stack.blocks)

    def __call__(self, state: ShrinkState) -> bool:
        now = sum(count_params(b) for b in state.stack.blocks)
        if not state.removed or self.block_params / max(now, 1) < self.target:
            return False
        speed = tokens_per_s(state.model, self.on)
        self.measured[state.num_steps] = speed
        return speed / self.reference >= self.target

    def export_check(self, model: nn.Module) -> dict:
        """The exported folder's speed against the original's (``shrink.json`` ``speed``)."""
        speed = tokens_per_s(model, self.on)
        return {"speedup_on": self.on, "target": self.target, "original_tokens_per_s": self.reference,
                "shrunk_tokens_per_s": speed, "speedup": speed / self.reference,
                "measured_on": "the exported folder, reloaded", "bench": vars(SHRINK_BENCH),
                "met": speed / self.reference >= self.target}
