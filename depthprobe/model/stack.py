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
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from depthprobe.errors import DepthprobeError


@dataclass(frozen=True)
class StreamSpec:
    """How a Pre-LN family reads and writes its residual stream (used by ``depthprobe.convert``).

    Block-relative paths unless said otherwise. ``readers`` maps each LayerNorm in a block to
    the linears that read its output (a parallel-residual block simply has two norms that read
    the same stream, or one norm that feeds both sublayers). ``writers`` are the linears whose
    outputs are added into the stream. ``embeds`` (relative to the base model) are embeddings
    added into the stream; one narrower than the stream (OPT's ``word_embed_proj_dim``) is not
    in the stream itself and reaches it through ``base_writers`` (OPT's ``project_in``).
    ``final_reader`` (relative to the base model) is the linear the final norm feeds when it
    is not the LM head (OPT's ``project_out``). ``pre_ln`` lists ``(config attribute, value
    it must hold, why a model without it cannot convert)`` for families whose blocks are only
    Pre-LN with LayerNorm under some settings (OPT ``do_layer_norm_before=True``).
    """

    readers: tuple[tuple[str, tuple[str, ...]], ...]
    writers: tuple[str, ...]
    embeds: tuple[str, ...]
    base_writers: tuple[str, ...] = ()
    final_reader: str | None = None
    pre_ln: tuple[tuple[str, object, str], ...] = ()


@dataclass(frozen=True)
class Family:
    """Where one family keeps its parts, as paths relative to its base model.

    ``base`` is the attribute that holds the base model inside the ``*ForCausalLM`` wrapper
    (absent when the user loaded the base model itself). ``attn`` and ``mlp`` name the
    modules inside one block that make up each sublayer (its input norm included), used for
    ``grad_norm_attn`` / ``grad_norm_mlp`` and sublayer drops; ``attn_out`` / ``mlp_out``
    name the module whose output is the sublayer's contribution (zeroed to drop it).
    """

    base: str
    blocks: str
    embed: str
    final_norm: str | None
    head: str | None = "lm_head"
    attn: tuple[str, ...] = ("input_layernorm", "self_attn")
    mlp: tuple[str, ...] = ("post_attention_layernorm", "mlp")
    attn_out: str | None = "self_attn"
    mlp_out: str | None = "mlp"
    #: positional ("pre", "post", "peri", "parallel") norm placement, for reports
    norm_placement: str = "pre"
    extra_per_layer_config: tuple[str, ...] = ()
    #: for Pre-LN (LayerNorm) families: who reads and writes the residual stream
    stream: StreamSpec | None = None


_POST_LN_REFUSAL = (
    "is Post-LN: the residual stream is normalized in place, so there is no Pre-RMSNorm equivalent; "
    "only Pre-LN models convert"
)

_LLAMA_LIKE = Family(base="model", blocks="layers", embed="embed_tokens", final_norm="norm")

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": Family(
        base="model", blocks="layers", embed="embed_tokens", final_norm="norm", extra_per_layer_config=("layer_types",)
    ),
    "qwen3": Family(
        base="model", blocks="layers", embed="embed_tokens", final_norm="norm", extra_per_layer_config=("layer_types",)
    ),
    "gemma2": Family(
        base="model",
        blocks="layers",
        embed="embed_tokens",
        final_norm="norm",
        attn=("input_layernorm", "self_attn", "post_attention_layernorm"),
        mlp=("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm"),
        attn_out="post_attention_layernorm",
        mlp_out="post_feedforward_layernorm",
        norm_placement="peri",
        extra_per_layer_config=("layer_types",),
    ),
    "olmo2": Family(
        base="model",
        blocks="layers",
        embed="embed_tokens",
        final_norm="norm",
        attn=("self_attn", "post_attention_layernorm"),
        mlp=("mlp", "post_feedforward_layernorm"),
        attn_out="post_attention_layernorm",
        mlp_out="post_feedforward_layernorm",
        norm_placement="peri-out",
    ),
    "phi": Family(
        base="model",
        blocks="layers",
        embed="embed_tokens",
        final_norm="final_layernorm",
        attn=("self_attn",),
        mlp=("mlp",),
        norm_placement="parallel",
        stream=StreamSpec(
            readers=(("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1")),),
            writers=("self_attn.dense", "mlp.fc2"),
            embeds=("embed_tokens",),
        ),
    ),
    "gpt2": Family(
        base="transformer",
        blocks="h",
        embed="wte",
        final_norm="ln_f",
        attn=("ln_1", "attn"),
        mlp=("ln_2", "mlp"),
        attn_out="attn",
        stream=StreamSpec(
            readers=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
            writers=("attn.c_proj", "mlp.c_proj"),
            embeds=("wte", "wpe"),
        ),
    ),
    "gpt_neox": Family(
        base="gpt_neox",
        blocks="layers",
        embed="embed_in",
        final_norm="final_layer_norm",
        attn=("input_layernorm", "attention"),
        mlp=("post_attention_layernorm", "mlp"),
        attn_out="attention",
        stream=StreamSpec(
            readers=(
                ("input_layernorm", ("attention.query_key_value",)),
                ("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
            ),
            writers=("attention.dense", "mlp.dense_4h_to_h"),
            embeds=("embed_in",),
        ),
    ),
    "opt": Family(
        base="model.decoder",
        blocks="layers",
        embed="embed_tokens",
        final_norm="final_layer_norm",
        attn=("self_attn_layer_norm", "self_attn"),
        mlp=("final_layer_norm", "fc1", "fc2"),
        mlp_out="fc2",
        stream=StreamSpec(
            readers=(
                ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                ("final_layer_norm", ("fc1",)),
            ),
            writers=("self_attn.out_proj", "fc2"),
            embeds=("embed_tokens", "embed_positions"),
            base_writers=("project_in",),
            final_reader="project_out",
            pre_ln=(("do_layer_norm_before", True, _POST_LN_REFUSAL),),
        ),
    ),
    "bert": Family(
        base="bert",
        blocks="encoder.layer",
        embed="embeddings",
        final_norm=None,
        head=None,
        attn=("attention",),
        mlp=("intermediate", "output"),
        attn_out="attention.output.dense",
        mlp_out="output.dense",
        norm_placement="post",
    ),
}
FAMILIES["roberta"] = dataclasses.replace(FAMILIES["bert"], base="roberta")
# depthprobe's own trainer model (depthprobe.train.model): norms absent from a placement
# are nn.Identity, so every name exists; the contribution of a sublayer is its norm_out.
FAMILIES["depthprobe_lm"] = Family(
    base="model",
    blocks="layers",
    embed="embed_tokens",
    final_norm="norm",
    attn=("attn_norm_in", "self_attn", "attn_norm_out", "attn_norm_post"),
    mlp=("mlp_norm_in", "mlp", "mlp_norm_out", "mlp_norm_post"),
    attn_out="attn_norm_out",
    mlp_out="mlp_norm_out",
    norm_placement="config",  # read from config.norm_placement
    stream=StreamSpec(  # convertible when trained with --norm pre and LayerNorm
        readers=(
            ("attn_norm_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("mlp_norm_in", ("mlp.gate_proj", "mlp.up_proj")),
        ),
        writers=("self_attn.o_proj", "mlp.down_proj"),
        embeds=("embed_tokens",),
        pre_ln=(
            ("norm_type", "layer", "already uses RMSNorm; there is nothing to convert"),
            ("norm_placement", "pre", "is not Pre-LN; only Pre-LN models convert"),
        ),
    ),
)

#: model types that are encoders (no causal LM objective): drop and lens use cosine drift
ENCODER_TYPES = frozenset({"bert", "roberta", "distilbert", "xlm-roberta", "electra", "mpnet"})


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
    _per_layer_config: tuple[str, ...] = field(default=())

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
                    f"{type(model).__name__}; candidates: {', '.join(_module_lists(model)[:5]) or 'none'}"
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

        path = _generic_blocks_path(model)
        if path is None:
            raise DepthprobeError(
                f"cannot find the transformer blocks of {type(model).__name__} "
                f"(model_type={model_type!r}); pass --layers-path with the dotted path of its "
                "block list, e.g. --layers-path model.layers"
            )
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
            if head is None and spec.head and hasattr(model, "get_output_embeddings"):
                head = model.get_output_embeddings()
            return cls(model, model_type, path, blocks, embed, final_norm, head, spec, spec.extra_per_layer_config)
        # Generic fallback: the first embedding, the output embeddings, and a norm that sits
        # beside the blocks in the same parent (e.g. `model.norm` next to `model.layers`).
        embed = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        parent = _get(model, base_path) if base_path else model
        final_norm = None
        for name in ("norm", "final_layernorm", "final_layer_norm", "ln_f", "final_norm"):
            final_norm = getattr(parent, name, None)
            if isinstance(final_norm, nn.Module):
                break
            final_norm = None
        return cls(model, model_type or "generic", path, blocks, embed, final_norm, head, None, ())

    # ------------------------------------------------------------------ plain facts
    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def is_causal_lm(self) -> bool:
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        return self.head is not None and model_type not in ENCODER_TYPES

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

    def sublayer_modules(self, layer: int, kind: str) -> list[nn.Module]:
        """The modules that make up sublayer ``kind`` ('attn' or 'mlp') of block ``layer``."""
        if self.spec is None:
            return []
        names = self.spec.attn if kind == "attn" else self.spec.mlp
        block = self.blocks[layer]
        return [m for m in (_get(block, n) for n in names) if m is not None]

    def sublayer_output_module(self, layer: int, kind: str) -> nn.Module | None:
        """The module whose output is sublayer ``kind``'s contribution to the stream."""
        if self.spec is None:
            return None
        return _get(self.blocks[layer], self.spec.attn_out if kind == "attn" else self.spec.mlp_out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and head applied to a residual-stream state ``(B, T, d) -> (B, T, V)``.

        Applied to the last block's raw output this reproduces the model's own logits.
        """
        if self.head is None:
            raise DepthprobeError("this model has no LM head; load a *ForCausalLM model for logits")
        h = self.final_norm(hidden) if self.final_norm is not None else hidden
        project_out = _get(self.model, "model.decoder.project_out") if self.family == "opt" else None
        if project_out is not None:
            h = project_out(h)
        out = self.head(h)
        softcap = getattr(getattr(self.model, "config", None), "final_logit_softcapping", None)
        if softcap:
            out = torch.tanh(out / softcap) * softcap
        return out

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final hidden state (after the final norm, if any) for a stream state."""
        return self.final_norm(hidden) if self.final_norm is not None else hidden

    # ------------------------------------------------------------------ structure edits
    @contextlib.contextmanager
    def keep_blocks(self, keep: Sequence[int]) -> Iterator[None]:
        """Run the model's own forward with only blocks ``keep`` (in order), then restore.

        Per-layer config lists (``layer_types``) and ``num_hidden_layers`` follow the kept
        blocks, so sliding-window / full attention stays attached to the right block.
        """
        keep = list(keep)
        parent, attr = self._parent_and_attr()
        config = getattr(self.model, "config", None)
        saved = {name: getattr(config, name) for name in self._per_layer_config if getattr(config, name, None)}
        saved_n = getattr(config, "num_hidden_layers", None)
        # modules that carry their block's position (attention `layer_idx`, used to index the
        # KV cache) are renumbered to their new position, then restored
        saved_idx = [(m, m.layer_idx) for m in self.blocks.modules() if isinstance(getattr(m, "layer_idx", None), int)]
        setattr(parent, attr, nn.ModuleList([self.blocks[i] for i in keep]))
        try:
            for name, values in saved.items():
                setattr(config, name, [values[i] for i in keep])
            if saved_n is not None:
                config.num_hidden_layers = len(keep)
            renumber_layer_idx(getattr(parent, attr))
            yield
        finally:
            setattr(parent, attr, self.blocks)
            for module, idx in saved_idx:
                module.layer_idx = idx
            for name, values in saved.items():
                setattr(config, name, values)
            if saved_n is not None:
                config.num_hidden_layers = saved_n

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

        handle = first.register_forward_pre_hook(swap_input, with_kwargs=True)
        try:
            with self.keep_blocks(keep):
                yield
        finally:
            handle.remove()

    def _parent_and_attr(self) -> tuple[nn.Module, str]:
        if "." in self.blocks_path:
            parent_path, attr = self.blocks_path.rsplit(".", 1)
            return self.model.get_submodule(parent_path), attr
        return self.model, self.blocks_path


def renumber_layer_idx(blocks: nn.ModuleList) -> None:
    """Set every ``layer_idx`` attribute inside block i to i (what a KV cache indexes by)."""
    for i, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = i


def block_output(output) -> torch.Tensor:
    """A block's hidden-state output, whether it returns a tensor or a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _module_lists(model: nn.Module) -> list[str]:
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    found.sort(key=lambda nm: -len(nm[1]))
    return [name for name, _ in found]


def _generic_blocks_path(model: nn.Module) -> str | None:
    """The longest ``nn.ModuleList`` whose items are all of one class (at least 2)."""
    best, best_len = None, 1
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > best_len and len({type(b) for b in m}) == 1:
            best, best_len = name, len(m)
    return best


def _path_matches(model: nn.Module, path: str, spec: Family) -> bool:
    base = spec.base if _get(model, spec.base) is not None else ""
    return path == (f"{base}.{spec.blocks}" if base else spec.blocks)
