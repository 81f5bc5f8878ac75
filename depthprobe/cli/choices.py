"""The names and defaults that click shows in ``--help``, importable without torch.

``depthprobe --help`` and every ``COMMAND --help`` must not import torch, transformers or
pandas (seconds each). The homes of these values are heavy modules; each name here is held
equal to its home by ``tests/test_cli_choices.py``.
"""

from __future__ import annotations

#: --dtype names (home: depthprobe.model.load.DTYPES)
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")
#: --metrics, --block-sizes, --attribution-steps, --execution: their one home is the (light) config
from depthprobe.config import (  # noqa: E402
    ALL_METRICS,
    DEFAULT_ATTRIBUTION_STEPS,
    DEFAULT_BLOCK_SIZES,
    DEFAULT_METRICS,
    EXECUTION_ORDERS,
)

__all__ = ["ALL_METRICS", "DEFAULT_ATTRIBUTION_STEPS", "DEFAULT_BLOCK_SIZES", "DEFAULT_METRICS", "EXECUTION_ORDERS"]
#: prune --strategy (home: depthprobe.prune.select.STRATEGIES)
STRATEGIES = ("drop", "greedy", "angular", "block-influence", "block")
#: convert --to (home: depthprobe.convert.fold.KINDS)
CONVERT_KINDS = ("rmsnorm", "crmsnorm")
#: train / compare (home: depthprobe.train.model)
PLACEMENT_NAMES = ("pre", "post", "mix", "peri", "lns", "deepnorm", "dyt")
NORM_TYPES = ("rms", "layer")
PRESET_NAMES = ("tiny", "cpu-small", "71m", "130m", "250m", "1b")
#: eval's built-in task (home: depthprobe.evaluate.cloze.TASK_NAME)
CLOZE_TASK = "depthprobe_cloze"
#: check tolerances (home: depthprobe.testing.compare)
DEFAULT_RTOL = 0.05
DEFAULT_ATOL = 1e-8
#: the share of repair windows that validates (home: depthprobe.prune.repair.RepairConfig.val_fraction)
REPAIR_VAL_FRACTION = 0.2
#: prune --bench-* defaults: small, a prune measures before and after in one process
PRUNE_BENCH_BATCH_SIZES = "1"
PRUNE_BENCH_PROMPT_LENS = "64"
PRUNE_BENCH_NEW_TOKENS = 8
PRUNE_BENCH_REPEATS = 1
#: --device-map strategies (home: depthprobe.model.load.DEVICE_MAPS)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
