"""Loading models and seeing them as a stack of blocks (the only family-aware code)."""

from depthprobe.model.load import PACKAGED_MODELS, load_model, resolve_device, resolve_dtype
from depthprobe.model.stack import FAMILIES, LayerStack, block_output

__all__ = ["FAMILIES", "PACKAGED_MODELS", "LayerStack", "block_output", "load_model", "resolve_device", "resolve_dtype"]
