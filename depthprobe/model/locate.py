"""Finding a model's parts where the family table (:mod:`depthprobe.model.families`) does
not name them: the block list, the input embeddings, the final norm; and the mixture-of-experts
counts, under whichever name the config uses. Used by :class:`~depthprobe.model.stack.LayerStack`.
"""

from __future__ import annotations

from torch import nn


def module_lists(model: nn.Module) -> list[str]:
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    found.sort(key=lambda nm: -len(nm[1]))
    return [name for name, _ in found]


def generic_blocks_path(model: nn.Module) -> str | None:
    """The block list: a ``ModuleList`` as long as the config's ``num_hidden_layers`` (the
    shallowest; hybrid models mix block classes), else the longest list of one class."""
    config = getattr(model, "config", None)
    counts = {getattr(c, "num_hidden_layers", None) for c in model_configs(config)} - {None}
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    sized = [name for name, m in lists if len(m) in counts and not _inside_list(name, lists)]
    if sized:
        # a multimodal wrapper has several stacks: the text one sits beside the input embeddings
        embed = input_embeddings(model)
        embed_parent = next((n.rsplit(".", 1)[0] if "." in n else "" for n, m in model.named_modules() if m is embed),
                            None)
        beside = [n for n in sized if (n.rsplit(".", 1)[0] if "." in n else "") == embed_parent]
        return min(beside or sized, key=lambda name: name.count("."))
    best, best_len = None, 1
    for name, m in lists:
        if len(m) > best_len and len({type(b) for b in m}) == 1:
            best, best_len = name, len(m)
    return best


def _inside_list(name: str, lists: list) -> bool:
    return any(name.startswith(other + ".") for other, _ in lists)


def model_configs(config) -> list:
    """The config and, for a multimodal model, its text config (where the block counts are)."""
    if config is None:
        return []
    found = [config]
    if hasattr(config, "get_text_config"):
        found.append(config.get_text_config())
    return found


def input_embeddings(model: nn.Module) -> nn.Module | None:
    if hasattr(model, "get_input_embeddings"):
        try:
            embed = model.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            embed = None
        if isinstance(embed, nn.Module):
            return embed
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


_FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "final_norm", "norm_f", "layer_norm",
                     "ln_out", "final_ln")


def find_final_norm(parent: nn.Module) -> nn.Module | None:
    """The norm beside the blocks: a known name, else the last norm-typed child."""
    for name in _FINAL_NORM_NAMES:
        module = getattr(parent, name, None)
        if isinstance(module, nn.Module):
            return module
    norms = [m for _, m in parent.named_children() if "norm" in type(m).__name__.lower()]
    return norms[-1] if norms else None


def num_experts(config) -> int | None:
    """Routed experts per MoE layer, from whichever name the config uses."""
    for c in model_configs(config):
        for name in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts"):
            value = getattr(c, name, None)
            if isinstance(value, int) and value > 1:
                return value
    return None


def experts_per_token(config) -> int | None:
    """Experts each token is routed to (top-k), or None."""
    for c in model_configs(config):
        for name in ("num_experts_per_tok", "moe_topk", "top_k", "num_experts_per_token", "moe_k"):
            value = getattr(c, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return None
