"""The units ``shrink`` removes (whole blocks, attention-only and MLP-only sublayers) and the
model they are removed from, for good, one at a time.

A unit is named ``block:L``, ``attn:L`` or ``mlp:L`` with ``L`` the block's index in the
*original* model, whatever has been removed before. :class:`ShrinkState` owns the model being
shrunk: a removed block is deleted (``export.remove_blocks``: config and ``layer_idx``
re-indexed), a removed sublayer is replaced by weightless
:class:`~depthprobe.model.shrunk.RemovedSublayer` stubs, so every parameter count here counts
only weights that are really gone (``nn.Module.parameters`` yields a tied weight once).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from depthprobe.errors import DepthprobeError
from depthprobe.model.shrunk import make_shrunk, output_structure
from depthprobe.model.stack import LayerStack
from depthprobe.probes.hooks import hooked_all, zero_output
from depthprobe.probes.scoring import WindowScorer
from depthprobe.prune.export import remove_blocks

KINDS = ("block", "attn", "mlp")


@dataclass(frozen=True, order=True)
class Unit:
    kind: str  # block | attn | mlp
    layer: int  # the block's index in the original model

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.layer}"

    @classmethod
    def parse(cls, text: str) -> Unit:
        kind, _, layer = str(text).partition(":")
        if kind not in KINDS or not layer.isdigit():
            raise DepthprobeError(f"unit {text!r} is not block:L, attn:L or mlp:L")
        return cls(kind, int(layer))


def count_params(module: nn.Module) -> int:
    """Parameters of ``module``, each shared (tied) tensor once."""
    return sum(p.numel() for p in module.parameters())


class ShrinkState:
    """The model being shrunk, which original blocks it still has and which sublayers are gone."""

    def __init__(self, model: nn.Module, layers_path: str | None = None):
        self.model = model
        self.stack = LayerStack.from_model(model, layers_path)
        self.stack.sublayers  # traced now, on the full model  # noqa: B018
        self.num_layers = len(self.stack)
        self.kept: list[int] = list(range(self.num_layers))
        self.gone: set[tuple[int, str]] = set()  # (original block, kind) of removed sublayers
        self.removed: list[Unit] = []
        self.num_steps = 0  # calls of remove (a block that empties goes in the same step)
        self.spec: list[dict] = []  # the RemovedSublayer entries, in current block numbering
        self.params_before = count_params(model)

    @property
    def params(self) -> int:
        return count_params(self.model)

    def index(self, layer: int) -> int:
        """Current position of original block ``layer``."""
        return self.kept.index(layer)

    def has(self, unit: Unit) -> bool:
        if unit.layer not in self.kept:
            return False
        return unit.kind == "block" or (unit.layer, unit.kind) not in self.gone and bool(
            self.stack.sublayer_modules(self.index(unit.layer), unit.kind))

    def unit_params(self, unit: Unit) -> int:
        """Parameters that removing ``unit`` takes away (now, after earlier removals)."""
        i = self.index(unit.layer)
        if unit.kind == "block":
            return count_params(self.stack.blocks[i])
        seen, total = set(), 0
        for module in self.stack.sublayer_modules(i, unit.kind):
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
        return total

    def candidates(self, kinds=KINDS) -> list[Unit]:
        """Every unit still in the model (no block removal that would leave no block)."""
        found = []
        for layer in self.kept:
            for kind in kinds:
                unit = Unit(kind, layer)
                if kind == "block" and len(self.kept) == 1:
                    continue
                if self.has(unit) and self.unit_params(unit) > 0:
                    found.append(unit)
        return found

    def scores_without(self, unit: Unit, windows, batch_size: int = 4) -> np.ndarray:
        """Each window's objective of the model with ``unit`` also removed (nothing kept removed)."""
        scorer = WindowScorer(self.stack, windows, batch_size)
        i = self.index(unit.layer)
        if unit.kind == "block":
            return scorer.scores([i])
        with zero_output(self.stack.sublayer_output_module(i, unit.kind)):
            return scorer.scores()

    def scores(self, windows, batch_size: int = 4) -> np.ndarray:
        """Each window's objective of the model as it is now."""
        return WindowScorer(self.stack, windows, batch_size).scores()

    def remove(self, unit: Unit) -> list[Unit]:
        """Remove ``unit`` for good; a block left with no sublayer goes too. The units removed."""
        if not self.has(unit):
            raise DepthprobeError(f"{unit.name} is not in the model (already removed?)")
        done = [unit]
        if unit.kind == "block":
            self._remove_block(unit.layer)
        else:
            self._remove_sublayer(unit)
            rest = [k for k in ("attn", "mlp") if self.has(Unit(k, unit.layer))]
            if not rest and len(self.kept) > 1:  # an empty block: its output is its input
                done.append(Unit("block", unit.layer))
                self._remove_block(unit.layer)
        self.removed += done
        self.num_steps += 1
        return done

    def _remove_block(self, layer: int) -> None:
        i = self.index(layer)
        sublayers = [dict(s) for s in self.stack.sublayers]
        self.stack = remove_blocks(self.stack, [i])
        self.stack._sublayers = sublayers[:i] + sublayers[i + 1:]
        self.kept.pop(i)
        self.spec = [{**e, "layer": e["layer"] - (e["layer"] > i)} for e in self.spec if e["layer"] != i]
        self._sync_spec()

    def _remove_sublayer(self, unit: Unit) -> None:
        i = self.index(unit.layer)
        span = self.stack.sublayers[i][unit.kind]
        if span.out is None:
            raise DepthprobeError(f"{unit.name}: this block's {unit.kind} sublayer is not separable")
        structure = self._structures(i, span.modules)
        cache = span.core if unit.kind == "attn" and hasattr(self._module(i, span.core), "layer_idx") else None
        if cache is None and unit.kind == "attn":
            cache = next((p for p in span.modules if hasattr(self._module(i, p), "layer_idx")), None)
        self.spec.append({"layer": i, "kind": unit.kind, "modules": structure, "cache": cache})
        self.gone.add((unit.layer, unit.kind))
        self._sync_spec()
        self.stack._sublayers[i] = {k: v for k, v in self.stack.sublayers[i].items() if k != unit.kind}

    def _module(self, i: int, path: str) -> nn.Module:
        return self.stack.blocks[i].get_submodule(path)

    def _structures(self, i: int, paths) -> dict[str, int]:
        """Each module's output structure (tensor or tuple length), from one probe forward."""
        seen: dict[str, int] = {}

        def hook(path):
            def record(module, args, output):
                seen.setdefault(path, output_structure(output))
            return record

        modules = [(self._module(i, p), hook(p)) for p in paths]
        with torch.no_grad(), hooked_all(modules):
            self.model(input_ids=self.stack.probe_ids(), use_cache=False)
        return {p: seen.get(p, 0) for p in paths}

    def _sync_spec(self) -> None:
        make_shrunk(self.model, self.stack.blocks_path, self.spec)
