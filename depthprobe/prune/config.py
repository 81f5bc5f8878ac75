"""What :func:`depthprobe.prune.prune` removes, how it chooses, and where it is judged."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

from depthprobe.config import PROBE_FIELDS, RUN_FIELDS, ProbeConfig, RunOptions
from depthprobe.prune.seam import SeamOptions

#: held-out windows a pruned model is scored on (of the calibration length)
HELDOUT_WINDOWS = 16


@dataclass(frozen=True)
class PruneConfig:
    """One pruning: the blocks (``remove``, or ``num_layers`` chosen by ``strategy``), the
    curves, the held-out scoring, the seam repair / healing and the calibration windows."""

    remove: tuple[int, ...] | None = None  # blocks to remove (else ``num_layers`` chosen by ``strategy``)
    num_layers: int | None = None  # K, the number of blocks to remove
    strategy: str = "greedy"  # drop | greedy | angular | block-influence | block ("manual" with ``remove``)
    curve: bool = True  # every strategy's pruning curve (loss against K)
    curve_max: int | None = None  # the curve's largest K (default: ``num_layers``)
    heldout: bool = True  # score the curve and the result on held-out windows (causal LMs)
    heldout_windows: int = HELDOUT_WINDOWS
    eval_text_file: str | None = None  # held-out text (default: the built-in text's tail)
    eval_dataset: str | None = None
    seam: SeamOptions | None = None  # repair / heal (None: plain removal)
    #: the calibration windows, batch size, layers path and sweep options (prune picks the metrics)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def __post_init__(self):
        if self.remove is not None:
            object.__setattr__(self, "remove", tuple(self.remove))


#: the keyword form of ``prune`` (deprecated): PruneConfig fields, ProbeConfig fields but the
#: metrics (prune chooses them), and RunOptions fields
PRUNE_FIELDS = tuple(f.name for f in dataclasses.fields(PruneConfig) if f.name != "probe")


def from_keywords(config: PruneConfig | None, run: RunOptions | None,
                  keywords: Mapping) -> tuple[PruneConfig, RunOptions]:
    """``prune(model, tok, num_layers=6, num_sequences=4, progress=False)`` (deprecated) as
    ``(PruneConfig, RunOptions)``; a keyword overrides that field of ``config`` / ``run``."""
    probe_fields = [f for f in PROBE_FIELDS if f != "metrics"]
    unknown = [k for k in keywords if k not in (*PRUNE_FIELDS, *probe_fields, *RUN_FIELDS)]
    if unknown:
        raise TypeError(f"prune() got an unexpected keyword argument {unknown[0]!r}")
    if keywords:
        warnings.warn("prune(model, tokenizer, num_layers=..., num_sequences=...) is deprecated; pass "
                      "config=PruneConfig(...) and run=RunOptions(...) (the keywords go in the next release)",
                      DeprecationWarning, stacklevel=3)
    config = config or PruneConfig()
    probe = {k: v for k, v in keywords.items() if k in probe_fields and v is not None}
    config = dataclasses.replace(config, probe=dataclasses.replace(config.probe, **probe),
                                 **{k: v for k, v in keywords.items() if k in PRUNE_FIELDS})
    run = dataclasses.replace(run or RunOptions(), **{k: v for k, v in keywords.items() if k in RUN_FIELDS})
    return config, run
