"""`VisionStack`: the residual blocks of an image classifier, their shortcuts, and lesions.

The one place that knows where image models keep their blocks:

- stage-based CNNs (transformers ResNet, ConvNeXt): every layer of ``encoder.stages[s].layers``
  in order (a ConvNeXt stage's downsampling layer sits between blocks and is no block);
- token models (ViT, DeiT, DINOv2): the encoder's layer list (as long as ``num_hidden_layers``);
- any other ``nn.Module``: the children of ``layers_path`` (a ``ModuleList`` or
  ``Sequential``), or its ``blocks`` list, or the longest list of one block class.

A block's **shortcut** is what it computes with its residual branch deleted (Veit et al.'s
lesion): ``activation(shortcut(x))`` for blocks with a ``shortcut`` (or torchvision's
``downsample``) and a post-addition ``activation`` / ``relu`` (ResNet: a 1x1 projection in a
downsampling block, identity elsewhere), the identity for pre-norm blocks (ViT, ConvNeXt)
and for any block whose output has its input's shape; none (not droppable) otherwise.

Everything runs the model's own forward: a lesioned block's output is replaced through a
forward hook (:meth:`VisionStack.replace_outputs`), so embeddings, pooling and the head stay
the model's own.

Example:
    >>> stack = VisionStack.from_model(model)                     # doctest: +SKIP
    >>> [b.name for b in stack.blocks][:2], stack.layout           # doctest: +SKIP
    (['resnet.encoder.stages.0.layers.0', 'resnet.encoder.stages.0.layers.1'], 'maps')
    >>> with stack.skip(3):                                         # block 3 replaced by its shortcut
    ...     logits = stack.logits(pixels)                           # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from depthprobe.errors import DepthprobeError
from depthprobe.hooking import hooked_all
from depthprobe.model.locate import generic_blocks_path

__all__ = ["VISION_TYPES", "VisionBlock", "VisionStack", "is_vision_model"]

#: transformers model types whose image classifiers depthprobe knows; value: how blocks are laid out
VISION_TYPES = {"resnet": "stages", "convnext": "stages", "convnextv2": "stages", "regnet": "stages",
                "vit": "tokens", "deit": "tokens", "dinov2": "tokens", "beit": "tokens", "data2vec-vision": "tokens"}


@dataclass
class VisionBlock:
    """One residual block: its dotted name, stage, module and shortcut (``None``: not droppable)."""

    name: str
    stage: int
    module: nn.Module
    shortcut: Callable[[torch.Tensor], torch.Tensor] | None
    shortcut_kind: str  # identity | projection | none
    downsample: bool = False  # changes the feature map's size or width (filled by the first trace)


def is_vision_model(model: nn.Module) -> bool:
    """An image classifier: a known vision ``model_type`` or a ``pixel_values`` forward."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) in VISION_TYPES:
        return True
    return getattr(model, "main_input_name", None) == "pixel_values"


def _output_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.logits if hasattr(output, "logits") else output[0]


def _with_tensor(output, tensor: torch.Tensor):
    """``output`` with its hidden state replaced (a block may return a tensor or a tuple)."""
    if isinstance(output, (tuple, list)):
        return type(output)([tensor, *output[1:]])
    return tensor


class VisionStack:
    """An image classifier seen as ``embed -> blocks -> pool/norm -> head``."""

    def __init__(self, model: nn.Module, family: str, blocks_path: str, blocks: list[VisionBlock]):
        if not blocks:
            raise DepthprobeError(f"found no residual blocks in {type(model).__name__}; pass --layers-path")
        self.model, self.family, self.blocks_path, self.blocks = model, family, blocks_path, blocks
        self.layout = "tokens" if VISION_TYPES.get(family) == "tokens" else "maps"
        self._traced = False

    def __len__(self) -> int:
        return len(self.blocks)

    def __repr__(self) -> str:
        return f"VisionStack({type(self.model).__name__}, family={self.family!r}, blocks={len(self)}, {self.layout})"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_channels(self) -> int:
        config = getattr(self.model, "config", None)
        channels = getattr(config, "num_channels", None) or getattr(config, "in_channels", None)
        if channels is None:
            first = next((m for m in self.model.modules() if isinstance(m, nn.Conv2d)), None)
            channels = first.in_channels if first is not None else 3
        return int(channels)

    @property
    def image_size(self) -> int | None:
        """The size the model was built for (ViT's position table), else None (any size)."""
        size = getattr(getattr(self.model, "config", None), "image_size", None)
        return int(size) if isinstance(size, int) and self.layout == "tokens" else None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: nn.Module, layers_path: str | None = None) -> VisionStack:
        """Find the residual blocks of ``model`` (``layers_path``: a list of blocks to use)."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        family = model_type if model_type in VISION_TYPES else "generic"
        if layers_path:
            return cls(model, family, layers_path, _blocks_of(model, layers_path, 0))
        if VISION_TYPES.get(model_type) == "stages":
            stages_path = next((n for n, m in model.named_modules() if n.endswith("encoder.stages")), None)
            if stages_path is not None:
                stages = model.get_submodule(stages_path)
                blocks = [b for s, stage in enumerate(stages) for b in _blocks_of(model, f"{stages_path}.{s}.layers", s)]
                return cls(model, family, f"{stages_path}.*.layers", blocks)
        path = "blocks" if isinstance(getattr(model, "blocks", None), nn.ModuleList) else generic_blocks_path(model)
        if path is None:
            raise DepthprobeError(f"cannot find the residual blocks of {type(model).__name__}; pass --layers-path "
                                  "with the dotted path of its block list, e.g. --layers-path blocks")
        return cls(model, family, path, _blocks_of(model, path, 0))

    # ------------------------------------------------------------------ running
    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The model's own logits ``(B, K)``."""
        return _output_tensor(self.model(pixel_values))

    @contextlib.contextmanager
    def replace_outputs(self, replace: Mapping[int, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
        """Within the block, block ``i``'s output is ``replace[i](its input)``; hooks removed after."""
        def hook_for(fn):
            def hook(module, args, kwargs, output):
                x = args[0] if args else kwargs["hidden_states"]
                return _with_tensor(output, fn(x))
            return hook

        with hooked_all(((self.blocks[i].module, hook_for(fn)) for i, fn in replace.items()), with_kwargs=True):
            yield

    def skip(self, layer: int):
        """Block ``layer`` replaced by its shortcut (raises when it has none)."""
        block = self.blocks[layer]
        if block.shortcut is None:
            raise DepthprobeError(f"block {layer} ({block.name}) has no shortcut: it cannot be dropped")
        return self.replace_outputs({layer: block.shortcut})

    def lens_blocks(self, layer: int) -> dict[int, Callable] | None:
        """Blocks after ``layer`` as identities (its output read by the model's own pool and
        head), or None when a later block changes the shape (the lens does not apply)."""
        self.trace()
        if any(b.downsample for b in self.blocks[layer + 1:]):
            return None
        return dict.fromkeys(range(layer + 1, len(self)), _identity)

    def trace(self, pixel_values: torch.Tensor | None = None) -> None:
        """Record which blocks change the feature shape (once; a small forward)."""
        if self._traced and pixel_values is None:
            return
        if pixel_values is None:
            size = self.image_size or 32
            pixel_values = torch.zeros(1, self.num_channels, size, size, device=self.device)
        shapes: dict[int, tuple] = {}

        def record(i):
            def hook(module, args, kwargs, out):
                x = args[0] if args else kwargs["hidden_states"]
                shapes[i] = (tuple(x.shape[1:]), tuple(_output_tensor(out).shape[1:]))
            return hook

        with hooked_all(((b.module, record(i)) for i, b in enumerate(self.blocks)), with_kwargs=True), torch.no_grad():
            self.logits(pixel_values)
        for i, b in enumerate(self.blocks):
            if i in shapes:
                b.downsample = shapes[i][0] != shapes[i][1]
                if b.downsample and b.shortcut_kind == "identity":  # a shape change has no identity shortcut
                    b.shortcut, b.shortcut_kind = None, "none"
        self._traced = True


def _blocks_of(model: nn.Module, path: str, stage: int) -> list[VisionBlock]:
    try:
        container = model.get_submodule(path)
    except AttributeError:
        container = None
    if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) == 0:
        raise DepthprobeError(f"--layers-path {path!r} does not name a non-empty nn.ModuleList or nn.Sequential "
                              f"of blocks in {type(model).__name__}")
    return [_block(f"{path}.{j}", stage, m) for j, m in enumerate(container)]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _block(name: str, stage: int, module: nn.Module) -> VisionBlock:
    projection = getattr(module, "shortcut", None)
    if projection is None:
        projection = getattr(module, "downsample", None)  # torchvision's BasicBlock / Bottleneck
    if not isinstance(projection, nn.Module) or isinstance(projection, nn.Identity):
        # pre-norm blocks, identity shortcuts, plain blocks: identity (none if the trace sees a shape change)
        return VisionBlock(name, stage, module, _identity, "identity")
    activation = getattr(module, "activation", None)
    if not isinstance(activation, nn.Module):
        activation = getattr(module, "relu", None)
    activation = activation if isinstance(activation, nn.Module) else nn.Identity()
    return VisionBlock(name, stage, module, lambda x: activation(projection(x)), "projection")
