"""Pre-LN -> Pre-RMSNorm / Pre-CRMSNorm conversion with identical logits (Jiang et al., 2023).

    >>> from depthprobe.convert import convert_to_rmsnorm, save_converted   # doctest: +SKIP
    >>> rms = convert_to_rmsnorm(model)          # a converted copy
    >>> save_converted(rms, tokenizer, "out/")    # reloads through depthprobe.load_model
"""

from depthprobe.convert.fold import CONFIG_KEY, KINDS, convert, convert_to_crmsnorm, convert_to_rmsnorm
from depthprobe.convert.io import (
    TOLERANCES,
    LogitDelta,
    load_converted,
    logit_delta,
    save_converted,
    tolerance,
)
from depthprobe.convert.norms import CRMSNorm, RMSNorm
from depthprobe.model.load import ModelLoader, register_loader

# folders written by `depthprobe convert` carry config.depthprobe_norm and load through here
register_loader(ModelLoader(CONFIG_KEY, lambda config: bool(getattr(config, CONFIG_KEY, None)), load_converted))

__all__ = [
    "CONFIG_KEY",
    "CRMSNorm",
    "KINDS",
    "LogitDelta",
    "RMSNorm",
    "TOLERANCES",
    "convert",
    "convert_to_crmsnorm",
    "convert_to_rmsnorm",
    "load_converted",
    "logit_delta",
    "save_converted",
    "tolerance",
]
