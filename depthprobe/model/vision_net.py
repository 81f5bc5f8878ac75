"""A small LNet/ANet-style residual CNN: ``stem -> blocks -> global average pool -> linear head``.

Each block is ``relu(branch(x) + shortcut(x))`` with a 1x1-conv projection shortcut where it
changes the width or stride (``residual=False`` drops the shortcut: a VGG-like plain net of
the same layers, for the lesion study). The global-average-pool head makes the class
activation map (CAM) of an output the head's weights applied at every position of the last
block. Trained by :mod:`depthprobe.train.vision`; saved as ``{"config", "state_dict"}``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from depthprobe import safeio
from depthprobe.errors import DepthprobeError

__all__ = ["MODEL_FILE", "ResidualBlock", "VisionNet", "VisionNetConfig", "load_vision_net", "save_vision_net",
           "transfer_weights"]

MODEL_FILE = "model.pt"


@dataclass(frozen=True)
class VisionNetConfig:
    """Shape of a :class:`VisionNet`; saved with its weights."""

    num_outputs: int = 10  # classes, or attributes when multilabel
    in_channels: int = 3
    channels: tuple[int, ...] = (16, 32, 64)  # one stage per entry; stages after the first halve the size
    blocks_per_stage: int = 2
    residual: bool = True  # False: a plain (VGG-like) net of the same layers
    multilabel: bool = False  # BCE per output instead of softmax cross-entropy
    stem_stride: int = 1  # 2 halves the first feature map (4x less compute on CPU)

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.num_outputs < 1 or self.blocks_per_stage < 1 or not self.channels:
            raise DepthprobeError("a VisionNet needs at least one output, stage and block per stage")


class ResidualBlock(nn.Module):
    """``relu(branch(x) + shortcut(x))``; ``shortcut`` is None in a plain net."""

    def __init__(self, cin: int, cout: int, stride: int, residual: bool):
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        projection = stride != 1 or cin != cout
        self.shortcut = None if not residual else (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) if projection
            else nn.Identity())
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C', H', W')
        out = self.branch(x)
        return self.activation(out + self.shortcut(x) if self.shortcut is not None else out)


class VisionNet(nn.Module):
    """``stem -> blocks -> pool -> head``: logits ``(B, num_outputs)`` from pixels ``(B, C, H, W)``."""

    main_input_name = "pixel_values"  # what marks an image model (as in transformers)

    def __init__(self, config: VisionNetConfig):
        super().__init__()
        self.config = config
        c0 = config.channels[0]
        self.stem = nn.Sequential(nn.Conv2d(config.in_channels, c0, 3, config.stem_stride, 1, bias=False), nn.BatchNorm2d(c0), nn.ReLU())
        blocks, cin = [], c0
        for s, cout in enumerate(config.channels):
            for b in range(config.blocks_per_stage):
                blocks.append(ResidualBlock(cin, cout, 2 if s > 0 and b == 0 else 1, config.residual))
                cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, config.num_outputs)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.stem(pixel_values)
        for block in self.blocks:
            h = block(h)
        return h

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(pixel_values)).flatten(1))


def save_vision_net(model: VisionNet, path: str | Path) -> Path:
    """``{"config": ..., "state_dict": ...}``, written atomically (weights and plain types only)."""
    data = {"config": dataclasses.asdict(model.config), "state_dict": model.state_dict()}
    safeio.atomic_write(Path(path), lambda p: torch.save(data, p))
    return Path(path)


def load_vision_net(path: str | Path) -> VisionNet:
    """A :class:`VisionNet` from :func:`save_vision_net`'s file (``weights_only`` load)."""
    data = safeio.load_checkpoint(path, map_location="cpu")
    if not isinstance(data, dict) or "config" not in data or "state_dict" not in data:
        raise DepthprobeError(f"{path} is not a depthprobe vision model (expected config and state_dict)")
    model = VisionNet(VisionNetConfig(**data["config"]))
    model.load_state_dict(data["state_dict"])
    return model.eval()


def transfer_weights(source: VisionNet, target: VisionNet) -> int:
    """Copy every tensor of ``source`` into ``target`` except the head (pre-training); the count."""
    own = target.state_dict()
    copied = {k: v for k, v in source.state_dict().items() if not k.startswith("head.") and k in own
              and own[k].shape == v.shape}
    target.load_state_dict(copied, strict=False)
    return len(copied)


