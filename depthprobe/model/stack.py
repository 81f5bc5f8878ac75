"""`LayerStack`: the one place that knows where each model family keeps its parts.

Everything else in depthprobe treats a model as ``embed -> blocks -> final norm -> head``
and never re-implements a family's forward pass. Skipping blocks or starting at block i is
done around the model's own forward (a swapped ``ModuleList`` and a pre-hook), so rotary
embeddings, attention masks and per-layer types stay the model's own.

Example:
    >>> stack = LayerStack.from_model(model)            # doctest: +SKIP
    >>> len(stack), stack.family, stack.blocks_path     # doctest: +SKIP
    (30, 'llama', 'model.layers')
    >>> with stack.keep_blocks([0, 1, 5]):              # doctest: +SKIP
    ...     out = model(input_ids)                      # runs only blocks 0, 1 and 5
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from depthprobe.errors import DepthprobeError
from depthprobe.hooking import hooked
from depthprobe.model.discover import Sublayer, bert_style_sublayers, discover_sublayers, router_of
from depthprobe.model.families import (
    ENCODER_TYPES,
    FAMILIES,
    Family,
    StreamSpec,
    earlier_state_reader,
    positional_block_inputs,
)
from depthprobe.model.locate import (  # noqa: F401  (num_experts, experts_per_token re-exported)
    experts_per_token,
    find_final_norm,
    generic_blocks_path,
    input_embeddings,
    module_lists,
    num_experts,
    refuse_parallel_lists,
)
from depthprobe.model.outputs import block_output, lm_logits  # noqa: F401 - re-exported, their home before
from depthprobe.model.slicing import (  # noqa: F401  (slice_layer_config re-exported)
    fold_index_constants,
    passed_through,
    remap_layer_maps,
    renumber_layer_idx,
    slice_layer_config,
    slice_per_layer_inputs,
)

__all__ = ["ENCODER_TYPES", "FAMILIES", "Family", "LayerStack", "StreamSpec", "Sublayer", "block_output"]

log = logging.getLogger(__name__)


def _get(root: nn.Module, path: str | None) -> nn.Module | None:
    if not path:
        return None
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


@dataclass
class LayerStack:
    """A model seen as ``embed -> blocks -> final norm -> head``.

    Attributes:
        model: the full model as loaded (with its head, if any).
        family: ``config.model_type`` when known, ``"generic"`` for the fallback.
        blocks_path: dotted path of the block ``ModuleList`` inside ``model``.
        blocks: the ``ModuleList`` itself.
        embed, final_norm, head: the modules, or ``None`` where the model has none.
        is_causal_lm: whether the model has an LM head and a next-token objective.
    """

    model: nn.Module
    family: str
    blocks_path: str
    blocks: nn.ModuleList
    embed: nn.Module | None
    final_norm: nn.Module | None
    head: nn.Module | None
    spec: Family | None = None
    #: per block, ``{kind: Sublayer}``; found on first use (see :mod:`depthprobe.model.discover`)
    _sublayers: list[dict[str, Sublayer]] | None = field(default=None, repr=False)
    #: why sublayers could not be found, when they could not
    sublayer_error: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:  # the dataclass default prints the whole model (twice)
        return (f"LayerStack({type(self.model).__name__}, family={self.family!r}, blocks={len(self.blocks)} "
                f"at {self.blocks_path!r}, head={'yes' if self.head is not None else 'no'})")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: nn.Module, layers_path: str | None = None) -> LayerStack:
        """Find the parts of ``model``; ``layers_path`` overrides where the blocks are."""
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        spec = FAMILIES.get(model_type) if model_type else None

        if layers_path:
            blocks = _get(model, layers_path)
            if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
                raise DepthprobeError(
                    f"--layers-path {layers_path!r} does not name a non-empty nn.ModuleList in "
                    f"{type(model).__name__}; candidates: {', '.join(module_lists(model)[:5]) or 'none'}"
                )
            if spec is not None and not _path_matches(model, layers_path, spec):
                spec = None
            return cls._assemble(model, model_type, spec, layers_path, blocks)

        if spec is not None:
            base_path = spec.base if _get(model, spec.base) is not None else ""
            path = f"{base_path}.{spec.blocks}" if base_path else spec.blocks
            blocks = _get(model, path)
            if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
                return cls._assemble(model, model_type, spec, path, blocks)

        path = generic_blocks_path(model)
        if path is None:
            raise DepthprobeError(
                f"cannot find the transformer blocks of {type(model).__name__} "
                f"(model_type={model_type!r}); pass --layers-path with the dotted path of its "
                "block list, e.g. --layers-path model.layers"
            )
        refuse_parallel_lists(model, model_type, path)
        return cls._assemble(model, model_type, None, path, _get(model, path))

    @classmethod
    def _assemble(
        cls, model: nn.Module, model_type: str | None, spec: Family | None, path: str, blocks: nn.ModuleList
    ) -> LayerStack:
        base_path = path.rsplit(".", 1)[0] if "." in path else ""
        if spec is not None:
            base_path = spec.base if _get(model, spec.base) is not None else ""
            prefix = f"{base_path}." if base_path else ""
            embed = _get(model, prefix + spec.embed)
            final_norm = _get(model, prefix + spec.final_norm) if spec.final_norm else None
            head = _get(model, spec.head) if spec.head else None
            if head is None and hasattr(model, "get_output_embeddings"):  # e.g. BERT built as a decoder
                head = model.get_output_embeddings()
            return cls(model, model_type, path, blocks, embed, final_norm, head, spec)
        # Generic: the model's input and output embeddings, and a norm that sits beside the
        # blocks in the same parent (e.g. `model.norm` next to `model.layers`).
        embed = input_embeddings(model)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        parent = _get(model, base_path) if base_path else model
        return cls(model, model_type or "generic", path, blocks, embed, find_final_norm(parent), head, None)

    # ------------------------------------------------------------------ plain facts
    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def is_causal_lm(self) -> bool:
        """A model with an LM head is scored by next-token loss: its forward gives logits,
        whatever ``is_decoder`` says (a BERT-like ``*LMHeadModel`` built as an encoder)."""
        return self.head is not None

    @property
    def norm_placement(self) -> str:
        if self.spec is not None and self.spec.norm_placement == "config":
            return str(getattr(self.model.config, "norm_placement", "unknown"))
        return self.spec.norm_placement if self.spec else "unknown"

    @property
    def device(self) -> torch.device:
        return next(self.blocks.parameters()).device

    def check_index(self, layer: int) -> int:
        """Return ``layer`` (negative counts from the end) or raise a user error."""
        n = len(self)
        if not -n <= layer < n:
            raise DepthprobeError(f"layer {layer} is out of range: this model has {n} blocks (0..{n - 1})")
        return layer % n

    @property
    def sublayers(self) -> list[dict[str, Sublayer]]:
        """Per block, ``{kind: Sublayer}`` for the kinds it has (``attn``, ``mlp``, ``mixer``).

        Named families read the table; every other model is inspected (one traced forward of
        a few tokens, once). Blocks of a hybrid model may differ (Mamba vs attention layers).
        """
        if self._sublayers is None:
            self._sublayers = self._find_sublayers()
        return self._sublayers

    def _find_sublayers(self) -> list[dict[str, Sublayer]]:
        if self.spec is not None:
            spans = {
                "attn": Sublayer("attn", self.spec.attn[0], self.spec.attn, self.spec.attn_out),
                "mlp": Sublayer("mlp", self.spec.mlp[0], self.spec.mlp, self.spec.mlp_out),
            }
            return [spans for _ in self.blocks]
        bert = [bert_style_sublayers(b) for b in self.blocks]
        if all(b is not None for b in bert):
            return bert
        try:
            return discover_sublayers(self.model, self.blocks, self.probe_ids())
        except Exception as exc:  # noqa: BLE001 - any forward failure just means "not found"
            self.sublayer_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            log.warning("could not trace the sublayers of %s: %s", type(self.model).__name__, self.sublayer_error)
            return [{} for _ in self.blocks]

    def probe_ids(self, length: int = 8) -> torch.Tensor:
        """A ``(1, length)`` batch of valid token ids on the input device (for tracing)."""
        vocab = getattr(self.embed, "num_embeddings", None) or getattr(
            getattr(self.model, "config", None), "vocab_size", None) or 2
        return (torch.arange(1, length + 1) % vocab).unsqueeze(0).to(self.input_device)

    @property
    def input_device(self) -> torch.device:
        """Where input ids go: the embedding's device (the first block's without one)."""
        params = list(self.embed.parameters()) if self.embed is not None else []
        return params[0].device if params else self.device

    def sublayer_modules(self, layer: int, kind: str) -> list[nn.Module]:
        """The modules that make up sublayer ``kind`` ('attn' or 'mlp') of block ``layer``."""
        span = self.sublayers[layer].get(kind)
        if span is None:
            return []
        block = self.blocks[layer]
        return [m for m in (_get(block, n) for n in span.modules) if m is not None]

    def sublayer_output_module(self, layer: int, kind: str) -> nn.Module | None:
        """The module whose output is sublayer ``kind``'s contribution to the stream."""
        span = self.sublayers[layer].get(kind)
        return _get(self.blocks[layer], span.out) if span is not None else None

    def sublayer_layers(self, kind: str, droppable: bool = False) -> list[int]:
        """Blocks that have sublayer ``kind`` (with ``droppable``: a separable contribution)."""
        return [
            i for i in range(len(self))
            if self.sublayer_modules(i, kind) and (not droppable or self.sublayer_output_module(i, kind) is not None)
        ]

    def not_applicable_note(self, kind: str, droppable: bool = False) -> str | None:
        """One line saying which blocks lack sublayer ``kind`` and why, or None if all have it."""
        have = set(self.sublayer_layers(kind, droppable))
        missing = [i for i in range(len(self)) if i not in have]
        if not missing:
            return None
        label = {"attn": "an attention", "mlp": "an MLP/MoE"}.get(kind, f"a {kind}")
        what = "separable " if droppable and any(self.sublayer_modules(i, kind) for i in missing) else ""
        where = "any block" if len(missing) == len(self) else f"blocks {_ranges(missing)}"
        has = sorted({k for spans in self.sublayers for k in spans})
        why = f"sublayers could not be traced ({self.sublayer_error})" if self.sublayer_error else (
            f"its blocks have {', '.join(has) if has else 'no recognised sublayers'}")
        return f"{type(self.model).__name__}: {where} have no {what}{label.split(' ', 1)[1]} sublayer ({why})"

    def describe_sublayers(self) -> str:
        """Sublayer kinds found, with the share of blocks when not all have one, e.g. ``attn 1/3, mlp``."""
        parts = []
        for kind in ("attn", "mixer", "mlp"):
            n = sum(kind in spans for spans in self.sublayers)
            if n:
                parts.append(kind if n == len(self) else f"{kind} {n}/{len(self)}")
        return ", ".join(parts) or "none"

    def router(self, layer: int) -> nn.Module | None:
        """The MoE router of block ``layer`` (its output: one logit per expert), or None."""
        span = self.sublayers[layer].get("mlp")
        core = _get(self.blocks[layer], span.core) if span is not None else None
        if core is None:
            return None
        return router_of(core, num_experts(getattr(self.model, "config", None)))

    @property
    def positionwise_head(self) -> bool:
        """Whether :meth:`logits` applies the final norm and head position by position (named
        families), so a slice of positions gives the same logits as the full state sliced."""
        return self.head is not None and self.spec is not None and bool(self.spec.head)

    def logits(self, hidden: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm and head applied to a residual-stream state ``(B, T, d) -> (B, T, V)``.

        Applied to the last block's raw output this reproduces the model's own logits. Named
        families apply their norm and head directly; any other model runs its own forward
        with ``hidden`` standing in for the last block's output, so logit scales, softcaps,
        projections before the head and multi-token heads stay the model's own; that forward
        is given ``input_ids`` when known (models that prepend positions of their own, like
        CPM-Ant's prompt tokens, size their position bias from them).
        """
        if self.head is None:
            raise DepthprobeError("this model has no LM head; load a *ForCausalLM model for logits")
        if self.spec is None or not self.spec.head:
            return self._logits_via_model(hidden, input_ids)
        h = self.final_norm(hidden) if self.final_norm is not None else hidden
        project_out = _get(self.model, "model.decoder.project_out") if self.family == "opt" else None
        if project_out is not None:
            h = project_out(h)
        out = self.head(h)
        softcap = getattr(getattr(self.model, "config", None), "final_logit_softcapping", None)
        if softcap:
            out = torch.tanh(out / softcap) * softcap
        return out

    def _logits_via_model(self, hidden: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        last = self.blocks[len(self) - 1]

        def replace_output(module, args, kwargs, output):
            if isinstance(output, (tuple, list)):
                return type(output)([hidden, *output[1:]])
            return hidden

        ids = (input_ids.to(self.input_device) if input_ids is not None
               else torch.zeros(hidden.shape[:2], dtype=torch.long, device=self.input_device))
        with hooked(last, post=replace_output), self.start_at(len(self) - 1, hidden):
            return lm_logits(self.model(input_ids=ids, use_cache=False))

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final hidden state (after the final norm, if any) for a stream state."""
        return self.final_norm(hidden) if self.final_norm is not None else hidden

    # ------------------------------------------------------------------ structure edits
    @property
    def layer_config(self):
        """The config that describes the blocks (a multimodal model's text config), or None."""
        config = getattr(self.model, "config", None)
        if config is None:
            return None
        candidates = [config]
        if hasattr(config, "get_text_config"):
            candidates.append(config.get_text_config())
        candidates += [v for v in vars(config).values() if hasattr(v, "num_hidden_layers")]
        for c in candidates:
            if getattr(c, "num_hidden_layers", None) == len(self):
                return c
        return config

    @property
    def reads_earlier_state(self) -> str | None:
        """Why a block reads state an earlier one left (shared indexers / KV), or None: drops rerun the prefix."""
        return earlier_state_reader(self.layer_config) if self.layer_config is not None else None

    @property
    def positional_inputs(self) -> str | None:
        """Why blocks get extra inputs by list position (per-layer embeddings), or None: skips pass through."""
        return positional_block_inputs(self.layer_config) if self.layer_config is not None else None

    @contextlib.contextmanager
    def keep_blocks(self, keep: Sequence[int]) -> Iterator[None]:
        """Run the model's own forward with only blocks ``keep`` (in order), then restore.

        The block list, ``num_hidden_layers``, every per-layer config entry and every
        ``layer_idx`` follow the kept blocks by the same rule as a permanent removal
        (:meth:`remove_blocks`), so sliding-window / full attention stays with its block.
        Where the forward picks per-block inputs by position (:attr:`positional_inputs`) the
        list keeps its length and the other blocks hand their input on unchanged.
        """
        keep = list(keep)
        if self.positional_inputs:
            with passed_through(*self._parent_and_attr(), self.blocks, keep):
                yield
            return
        saved_idx = [(m, m.layer_idx) for m in self.blocks.modules() if isinstance(getattr(m, "layer_idx", None), int)]
        config = self.layer_config
        saved_maps = remap_layer_maps(self.blocks, keep)
        saved_config = self._apply_keep(keep, config)
        try:
            yield
        finally:
            parent, attr = self._parent_and_attr()
            setattr(parent, attr, self.blocks)
            for module, idx in saved_idx:
                module.layer_idx = idx
            for module, name, value in saved_maps:
                setattr(module, name, value)
            for name, value in reversed(saved_config.items()):  # reversed: aliases (n_layer) end right
                setattr(config, name, value)

    def remove_blocks(self, remove: Sequence[int]) -> LayerStack:
        """Delete blocks ``remove`` for good (same rule as :meth:`keep_blocks`); the new stack."""
        drop = set(remove)
        keep = [i for i in range(len(self)) if i not in drop]
        if not keep:
            raise DepthprobeError("cannot remove every block; keep at least one")
        if drop and self.positional_inputs:  # the packed per-layer input weights follow the blocks
            slice_per_layer_inputs(self._parent_and_attr()[0], keep, len(self),
                                   self.layer_config.hidden_size_per_layer_input)
        remap_layer_maps(self.blocks, keep)
        fold_index_constants(nn.ModuleList([self.blocks[i] for i in keep]), keep)
        self._apply_keep(keep, self.layer_config)
        new = LayerStack.from_model(self.model, self.blocks_path if self.spec is None else None)
        if self._sublayers is not None:
            new._sublayers = [self._sublayers[i] for i in keep]
        return new

    def _apply_keep(self, keep: list[int], config) -> dict:
        """Swap in blocks ``keep`` and make ``config`` and ``layer_idx`` follow; the old config values."""
        parent, attr = self._parent_and_attr()
        kept = nn.ModuleList([self.blocks[i] for i in keep])
        kept.training = self.blocks.training
        setattr(parent, attr, kept)
        renumber_layer_idx(kept)
        return slice_layer_config(config, keep, len(self)) if config is not None else {}

    @contextlib.contextmanager
    def start_at(self, layer: int, hidden: torch.Tensor, keep: Sequence[int] | None = None) -> Iterator[None]:
        """Run only blocks ``layer..L-1`` (or ``keep``, all >= layer), feeding ``hidden`` as
        the first one's input: the prefix is not recomputed.

        The model's own prelude (embeddings, masks, rotary tables) still runs; its output is
        replaced at the first kept block by ``hidden`` through a forward pre-hook.
        """
        keep = list(range(layer, len(self))) if keep is None else list(keep)
        if not keep:
            raise DepthprobeError("start_at needs at least one block to run")
        first = self.blocks[keep[0]]

        def swap_input(module, args, kwargs):
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        with hooked(first, pre=swap_input), self.keep_blocks(keep):
            yield

    def _parent_and_attr(self) -> tuple[nn.Module, str]:
        if "." in self.blocks_path:
            parent_path, attr = self.blocks_path.rsplit(".", 1)
            return self.model.get_submodule(parent_path), attr
        return self.model, self.blocks_path


def _ranges(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(parts)


def _path_matches(model: nn.Module, path: str, spec: Family) -> bool:
    base = spec.base if _get(model, spec.base) is not None else ""
    return path == (f"{base}.{spec.blocks}" if base else spec.blocks)
