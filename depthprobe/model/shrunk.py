"""A model of a supported family with some attention / MLP sublayers removed, saved so that
plain ``AutoModelForCausalLM.from_pretrained`` loads it (no remote code) once depthprobe is imported.

No transformers architecture of the Llama family has a per-layer "no attention" or "no MLP"
switch, so a folder with removed sublayers is written as its own model type,
``depthprobe_shrunk``: ``config.json`` holds the family's own config (``base_config``), the
block list's path and, per removed sublayer, the block (numbered as saved), its kind and the
block-relative modules it consisted of. Loading builds the family's own class (a dynamic
subclass, ``Shrunk<Family>ForCausalLM``: generation, masks, rotary tables and the KV cache stay
the family's) and puts a :class:`RemovedSublayer` where each removed module was, before the
weights are read: the safetensors hold no weight of a removed sublayer, and none is missing.

A folder with only whole blocks removed is a plain folder of the family (see ``prune.export``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache

MODEL_TYPE = "depthprobe_shrunk"
#: the base config's attribute that carries the removed sublayers in a loaded model
SPEC_ATTR = "depthprobe_removed_sublayers"


class RemovedSublayer(nn.Module):
    """Stands where a module of a removed sublayer was: no weights; returns zeros shaped as its
    input, in the module's output structure (a tensor, or a tuple of ``tuple_len`` with the
    zeros first), so the block adds nothing to the residual stream.

    A removed attention keeps its ``layer_idx`` and writes an empty (zero-head) key/value entry
    to the KV cache: the model reads the cache's length from layer 0, which must stay right
    when that layer's attention is gone.
    """

    def __init__(self, tuple_len: int = 0, layer_idx: int | None = None):
        super().__init__()
        self.tuple_len = int(tuple_len)
        if layer_idx is not None:
            self.layer_idx = int(layer_idx)

    def extra_repr(self) -> str:
        return f"tuple_len={self.tuple_len}" + (f", layer_idx={self.layer_idx}" if hasattr(self, "layer_idx") else "")

    def forward(self, *args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()]
        x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states", tensors[0])
        if hasattr(self, "layer_idx"):
            cache = next((v for v in kwargs.values() if isinstance(v, Cache)), None)
            if cache is not None:  # keep the cache's length: an empty entry of T positions
                empty = x.new_zeros(x.shape[0], 0, x.shape[1], 1)
                cache.update(empty, empty, self.layer_idx)
        zeros = torch.zeros_like(x)
        return zeros if not self.tuple_len else (zeros, *([None] * (self.tuple_len - 1)))


def output_structure(output) -> int:
    """0 for a tensor output, else the tuple's length (what :class:`RemovedSublayer` mimics)."""
    return len(output) if isinstance(output, (tuple, list)) else 0


def apply_removed(model: nn.Module, blocks_path: str, spec: Sequence[dict]) -> None:
    """Put a :class:`RemovedSublayer` where each module of ``spec`` is (entries: ``layer``,
    ``kind``, ``modules``: block-relative path -> output structure, ``cache``: the attention
    module whose ``layer_idx`` the KV cache uses, or None)."""
    blocks = model.get_submodule(blocks_path)
    for entry in spec:
        block = blocks[int(entry["layer"])]
        for path, tuple_len in entry["modules"].items():
            parent, _, name = path.rpartition(".")
            owner = block.get_submodule(parent) if parent else block
            old = getattr(owner, name)
            if isinstance(old, RemovedSublayer):
                continue
            idx = None
            if path == entry.get("cache"):  # the attention the KV cache indexes
                idx = old.layer_idx if isinstance(getattr(old, "layer_idx", None), int) else int(entry["layer"])
            setattr(owner, name, RemovedSublayer(tuple_len, idx))


class DepthprobeShrunkConfig(PretrainedConfig):
    """``config.json`` of a shrunk folder: the family's config and the removed sublayers."""

    model_type = MODEL_TYPE

    def __init__(self, base_config: dict | None = None, blocks_path: str = "model.layers",
                 removed_sublayers: list | None = None, **kwargs):
        self.base_config = dict(base_config or {})
        self.blocks_path = blocks_path
        self.removed_sublayers = list(removed_sublayers or [])
        super().__init__(**kwargs)

    def base(self) -> PretrainedConfig:
        """The family's own config, carrying the removed sublayers (``SPEC_ATTR``)."""
        values = {k: v for k, v in self.base_config.items() if k != SPEC_ATTR}
        config = AutoConfig.for_model(**values)
        setattr(config, SPEC_ATTR, {"blocks_path": self.blocks_path, "removed": self.removed_sublayers})
        return config


_CLASSES: dict[type, type] = {}


def shrunk_class(base_cls: type) -> type:
    """``Shrunk<Family>``: the family's class, with removed sublayers stubbed at construction and
    a ``save_pretrained`` that writes the ``depthprobe_shrunk`` config (so a re-save stays loadable)."""
    if getattr(base_cls, "_depthprobe_shrunk", False):
        return base_cls
    if base_cls not in _CLASSES:
        def __init__(self, config, *args, **kwargs):
            base_cls.__init__(self, config, *args, **kwargs)
            spec = getattr(config, SPEC_ATTR, None)
            if spec:
                apply_removed(self, spec["blocks_path"], spec["removed"])

        def save_pretrained(self, save_directory, *args, **kwargs):
            base_cls.save_pretrained(self, save_directory, *args, **kwargs)
            write_config(self.config, save_directory)

        _CLASSES[base_cls] = type(f"Shrunk{base_cls.__name__}", (base_cls,), {
            "__init__": __init__, "save_pretrained": save_pretrained, "_depthprobe_shrunk": True,
            "__module__": __name__, "__doc__": f"{base_cls.__name__} with removed sublayers (depthprobe shrink)."})
    return _CLASSES[base_cls]


def write_config(base: PretrainedConfig, folder: str | Path) -> None:
    """Replace the family's ``config.json`` in ``folder`` by the ``depthprobe_shrunk`` one
    (unchanged when ``base`` has no removed sublayer: a plain folder of the family)."""
    spec = getattr(base, SPEC_ATTR, None)
    if not spec or not spec["removed"]:
        return
    values = {k: v for k, v in base.to_dict().items() if k != SPEC_ATTR}
    config = DepthprobeShrunkConfig(base_config=values, blocks_path=spec["blocks_path"],
                                    removed_sublayers=spec["removed"], architectures=["DepthprobeShrunkForCausalLM"])
    path = Path(folder) / "config.json"
    path.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")


class DepthprobeShrunkForCausalLM(PreTrainedModel):
    """What ``AutoModelForCausalLM`` maps ``depthprobe_shrunk`` to: its ``from_pretrained``
    returns the family's own model (``Shrunk<Family>``) with the removed sublayers stubbed."""

    config_class = DepthprobeShrunkConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        if not isinstance(config, DepthprobeShrunkConfig):
            config = DepthprobeShrunkConfig.from_pretrained(pretrained_model_name_or_path)
        base = config.base()
        family = shrunk_class(AutoModelForCausalLM._model_mapping[type(base)])
        return family.from_pretrained(pretrained_model_name_or_path, *args, config=base, **kwargs)


def make_shrunk(model: nn.Module, blocks_path: str, spec: list[dict]) -> None:
    """Turn a loaded model into its ``Shrunk<Family>`` (in place): ``spec``'s sublayers stubbed
    and recorded in its config, so it saves as a ``depthprobe_shrunk`` folder."""
    setattr(model.config, SPEC_ATTR, {"blocks_path": blocks_path, "removed": [dict(e) for e in spec]})
    apply_removed(model, blocks_path, spec)
    model.__class__ = shrunk_class(type(model))


def register() -> None:
    """Let ``AutoConfig`` / ``AutoModelForCausalLM`` load ``depthprobe_shrunk`` folders."""
    try:
        AutoConfig.register(MODEL_TYPE, DepthprobeShrunkConfig)
        AutoModelForCausalLM.register(DepthprobeShrunkConfig, DepthprobeShrunkForCausalLM)
    except ValueError:  # already registered
        pass


register()
