"""What :func:`depthprobe.prune.prune` removes, how it chooses, and where it is judged."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from depthprobe.config import PROBE_FIELDS, RUN_FIELDS, ProbeConfig, RunOptions, keyword_overrides
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
    probe_fields = tuple(f for f in PROBE_FIELDS if f != "metrics")  # prune chooses the metrics
    prune, probe, run_keywords = keyword_overrides("prune", keywords, PRUNE_FIELDS, probe_fields, RUN_FIELDS)
    config = config or PruneConfig()
    probe = dataclasses.replace(config.probe, **{k: v for k, v in probe.items() if v is not None})
    config = dataclasses.replace(config, probe=probe, **prune)
    run = dataclasses.replace(run or RunOptions(), **run_keywords)
    return config, run
