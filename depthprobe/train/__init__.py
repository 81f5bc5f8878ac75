"""Small decoder LMs with a choice of normalization placement, their trainer and comparison.

- :mod:`depthprobe.train.model`: the model (``pre|post|mix|peri|lns|deepnorm``), presets.
- :mod:`depthprobe.train.data`: training tokens (built-in text, byte-level tokenizer).
- :mod:`depthprobe.train.trainer`: :func:`train` / :class:`Trainer` with per-layer diagnostics.
- :mod:`depthprobe.train.compare`: :func:`compare` variants across seeds.

Importing this package registers ``depthprobe_lm`` with transformers' Auto classes.
"""

from depthprobe.train.model import (
    PRESETS,
    DepthprobeLMConfig,
    DepthprobeLMForCausalLM,
    ModelConfig,
    build_model,
    register_auto_classes,
)

register_auto_classes()

__all__ = [
    "PRESETS",
    "DepthprobeLMConfig",
    "DepthprobeLMForCausalLM",
    "ModelConfig",
    "build_model",
]
