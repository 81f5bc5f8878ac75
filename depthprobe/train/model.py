"""A small decoder LM whose normalization placement is one option, read top to bottom.

Parts, in dependency order: config -> norms -> rotary embedding -> attention -> MLP -> block
-> placement builders -> model. Every block has the same shape; only the norms injected
into it differ (identity where a placement has none). With N a norm and F a sublayer
(attention, then MLP), one sublayer of each placement is:

=========  ==========================================  ==================================
variant    one sublayer                                injected into the block
=========  ==========================================  ==================================
pre        h = h + F(N(h))                             norm_in
post       h = N(h + F(h))                             norm_post
mix        post for blocks l < round(alpha*L), pre     (per block)
           after (Li et al. 2024, Mix-LN)
peri       h = h + N_out(F(N_in(h)))                   norm_in, norm_out
lns        h = h + F(N(h) / sqrt(l+1))                 norm_in scaled (Sun et al. 2025,
                                                       LayerNorm Scaling)
deepnorm   h = N(beta*h + F(h)), beta = (2L)^(1/4)     norm_post, residual_scale
dyt        pre, every norm (final one too) replaced by     norm_in (DyT)
           DyT(x) = gamma*tanh(alpha*x) + beta
           (Zhu et al. 2025, "Transformers without
           Normalization"); their LLM recipe: alpha0
           of the attention-input DyT apart from the
           others, and a learnable scalar (init
           sqrt(d)) times the embeddings
=========  ==========================================  ==================================

All placements end with a final norm before the head. The model is a transformers
``PreTrainedModel`` (``model_type="depthprobe_lm"``), registered with ``AutoConfig`` and
``AutoModelForCausalLM`` when :mod:`depthprobe.train` is imported, so a saved run loads
with ``depthprobe.load_model(run_dir / "model")`` like any hub model.

Example:
    >>> config = DepthprobeLMConfig(**PRESETS["tiny"], norm_placement="mix")
    >>> model = DepthprobeLMForCausalLM(config)
    >>> out = model(input_ids=torch.randint(0, 259, (2, 16)), labels=...)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from depthprobe.errors import DepthprobeError
from depthprobe.inputs import require_finite, require_positive_ints

PLACEMENT_NAMES = ("pre", "post", "mix", "peri", "lns", "deepnorm", "dyt")
NORM_TYPES = ("rms", "layer")


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class ModelConfig:
    """Shape and normalization of the model; saved with every checkpoint and run."""

    vocab_size: int = 259  # byte-level tokenizer: 256 bytes + pad/eos/unk (ByT5 layout)
    hidden_size: int = 64  # d, width of the residual stream
    num_hidden_layers: int = 4  # L blocks
    num_attention_heads: int = 4  # d must divide by this; head size d / heads
    intermediate_size: int = 172  # SwiGLU hidden width (about 8/3 d, as in Llama)
    max_position_embeddings: int = 256  # longest sequence; RoPE needs no table, this is a guard
    norm_placement: str = "pre"  # one of PLACEMENT_NAMES
    norm_type: str = "rms"  # "rms" (RMSNorm) or "layer" (LayerNorm with bias)
    norm_eps: float = 1e-5
    mix_alpha: float = 0.25  # mix: fraction of blocks (from the bottom) that are Post-LN
    deepnorm_init: bool = True  # deepnorm: scale init of value/output/MLP weights by (8L)^(-1/4)
    dyt_alpha0: float = 0.5  # dyt: initial alpha of the MLP-input and final DyT (the paper's default)
    dyt_alpha0_attn: float | None = None  # dyt: initial alpha of the attention-input DyT (None: dyt_alpha0)
    dyt_embed_scale: bool = True  # dyt: learnable scalar after the embedding (the paper's LLMs)
    dyt_embed_scale_init: float | None = None  # its initial value (None: sqrt(d), the paper's)
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False  # head shares the embedding matrix
    initializer_range: float = 0.02  # std of the normal init of linears and embeddings

    def __post_init__(self):
        if self.norm_placement not in PLACEMENT_NAMES:
            raise DepthprobeError(
                f"unknown norm placement {self.norm_placement!r}; choose one of {', '.join(PLACEMENT_NAMES)}"
            )
        if self.norm_type not in NORM_TYPES:
            raise DepthprobeError(f"unknown norm type {self.norm_type!r}; choose rms or layer")
        require_positive_ints(self, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                     "intermediate_size", "max_position_embeddings"))
        require_finite(self, ("norm_eps", "mix_alpha", "rope_theta", "initializer_range"))
        if self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 2:
            raise DepthprobeError(
                f"hidden size {self.hidden_size} must split into {self.num_attention_heads} heads of an even size"
            )
        if not self.dyt_alpha0 > 0:
            raise DepthprobeError(f"--dyt-alpha0 must be positive (got {self.dyt_alpha0})")
        if self.dyt_alpha0_attn is not None and not self.dyt_alpha0_attn > 0:
            raise DepthprobeError(f"--dyt-alpha0-attn must be positive (got {self.dyt_alpha0_attn})")
        if not 0.0 <= self.mix_alpha <= 1.0:
            raise DepthprobeError(f"--mix-alpha must be between 0 and 1 (got {self.mix_alpha})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_post_blocks(self) -> int:
        """mix: blocks 0 .. round(alpha*L)-1 are Post-LN (round half up)."""
        return math.floor(self.mix_alpha * self.num_hidden_layers + 0.5)


#: sizes; the last four are the papers' reference models (Mix-LN, LayerNorm Scaling)
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=172),
    "cpu-small": dict(hidden_size=128, num_hidden_layers=8, num_attention_heads=4, intermediate_size=344),
    "71m": dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=1368),
    "130m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048),
    "250m": dict(hidden_size=768, num_hidden_layers=24, num_attention_heads=16, intermediate_size=2560),
    "1b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, intermediate_size=5461),
}


class DepthprobeLMConfig(PretrainedConfig):
    """The transformers face of :class:`ModelConfig` (same fields, saved as config.json)."""

    model_type = "depthprobe_lm"

    def __init__(self, **kwargs):
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        spec = ModelConfig(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        for name in names:
            setattr(self, name, getattr(spec, name))
        kwargs.pop("tie_word_embeddings", None)
        super().__init__(tie_word_embeddings=spec.tie_word_embeddings, **kwargs)

    @classmethod
    def from_spec(cls, spec: ModelConfig) -> DepthprobeLMConfig:
        return cls(**dataclasses.asdict(spec))

    @property
    def spec(self) -> ModelConfig:
        return ModelConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)})


# ----------------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * g (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class ScaledNorm(nn.Module):
    """N(x) * scale: LayerNorm Scaling's N(h) / sqrt(l+1) (Sun et al. 2025, Curse of Depth)."""

    def __init__(self, norm: nn.Module, scale: float):
        super().__init__()
        self.norm = norm
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * self.scale


class DyT(nn.Module):
    """Dynamic Tanh, gamma * tanh(alpha * x) + beta (Zhu et al. 2025, "Transformers without
    Normalization"): a norm-free stand-in for a norm; alpha is one learnable scalar (init
    ``alpha0``), gamma and beta per channel (init ones and zeros)."""

    def __init__(self, dim: int, alpha0: float):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), float(alpha0)))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.tanh(self.alpha * x) + self.bias


def make_norm(cfg: ModelConfig, attention_input: bool = False) -> nn.Module:
    """The norm of ``cfg``: DyT in every position for ``dyt`` (alpha0 of an attention input
    apart, as the paper's LLMs), else RMSNorm or LayerNorm."""
    if cfg.norm_placement == "dyt":
        attn_alpha0 = cfg.dyt_alpha0 if cfg.dyt_alpha0_attn is None else cfg.dyt_alpha0_attn
        return DyT(cfg.hidden_size, attn_alpha0 if attention_input else cfg.dyt_alpha0)
    if cfg.norm_type == "rms":
        return RMSNorm(cfg.hidden_size, cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


# ----------------------------------------------------------------------------- attention
def rotary(head_dim: int, theta: float, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables ``cos, sin`` of shape ``(T, head_dim)`` (Su et al. 2021), made per call."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)  # (T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, head_dim)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (B, H, T, hd)`` by position: x*cos + rotate_half(x)*sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary positions, no biases."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # not x's width: d-1 after CRMSNorm


# ----------------------------------------------------------------------------- MLP
class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------- block
class Block(nn.Module):
    """One transformer block; the norm placement is whatever norms it is given.

    Each sublayer computes ``h = norm_post(residual_scale*h + norm_out(F(norm_in(h))))``;
    a norm not given is the identity.
    """

    def __init__(
        self,
        self_attn: nn.Module,
        mlp: nn.Module,
        *,
        attn_norm_in: nn.Module | None = None,
        attn_norm_out: nn.Module | None = None,
        attn_norm_post: nn.Module | None = None,
        mlp_norm_in: nn.Module | None = None,
        mlp_norm_out: nn.Module | None = None,
        mlp_norm_post: nn.Module | None = None,
        residual_scale: float = 1.0,
    ):
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.attn_norm_in = attn_norm_in or nn.Identity()
        self.attn_norm_out = attn_norm_out or nn.Identity()
        self.attn_norm_post = attn_norm_post or nn.Identity()
        self.mlp_norm_in = mlp_norm_in or nn.Identity()
        self.mlp_norm_out = mlp_norm_out or nn.Identity()
        self.mlp_norm_post = mlp_norm_post or nn.Identity()
        self.residual_scale = residual_scale

    def forward(self, hidden_states: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h, a = hidden_states, self.residual_scale  # (B, T, d)
        h = self.attn_norm_post(a * h + self.attn_norm_out(self.self_attn(self.attn_norm_in(h), rope)))
        h = self.mlp_norm_post(a * h + self.mlp_norm_out(self.mlp(self.mlp_norm_in(h))))
        return h


# ----------------------------------------------------------------------------- placements
# Each builder says which norms block ``layer`` gets; nothing else differs between variants.
def pre_norms(cfg: ModelConfig, layer: int) -> dict:
    return dict(attn_norm_in=make_norm(cfg, attention_input=True), mlp_norm_in=make_norm(cfg))


def post_norms(cfg: ModelConfig, layer: int) -> dict:
    return dict(attn_norm_post=make_norm(cfg), mlp_norm_post=make_norm(cfg))


def mix_norms(cfg: ModelConfig, layer: int) -> dict:
    return post_norms(cfg, layer) if layer < cfg.num_post_blocks else pre_norms(cfg, layer)


def peri_norms(cfg: ModelConfig, layer: int) -> dict:
    return dict(
        attn_norm_in=make_norm(cfg), attn_norm_out=make_norm(cfg), mlp_norm_in=make_norm(cfg), mlp_norm_out=make_norm(cfg)
    )


def lns_norms(cfg: ModelConfig, layer: int) -> dict:
    scale = 1.0 / math.sqrt(layer + 1)
    return dict(attn_norm_in=ScaledNorm(make_norm(cfg), scale), mlp_norm_in=ScaledNorm(make_norm(cfg), scale))


def deepnorm_norms(cfg: ModelConfig, layer: int) -> dict:
    return dict(post_norms(cfg, layer), residual_scale=(2 * cfg.num_hidden_layers) ** 0.25)


PLACEMENTS = {
    "pre": pre_norms,
    "post": post_norms,
    "mix": mix_norms,
    "peri": peri_norms,
    "lns": lns_norms,
    "deepnorm": deepnorm_norms,
    "dyt": pre_norms,  # pre's positions; make_norm returns DyT for this placement
}


def build_block(cfg: ModelConfig, layer: int) -> Block:
    return Block(Attention(cfg), SwiGLU(cfg), **PLACEMENTS[cfg.norm_placement](cfg, layer))


# ----------------------------------------------------------------------------- model
class DepthprobeLMPreTrainedModel(PreTrainedModel):
    config_class = DepthprobeLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_sdpa = True


class DepthprobeLMModel(DepthprobeLMPreTrainedModel):
    """Embedding -> blocks -> final norm; returns the final hidden state ``(B, T, d)``."""

    def __init__(self, config: DepthprobeLMConfig):
        super().__init__(config)
        cfg = config.spec
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(build_block(cfg, layer) for layer in range(cfg.num_hidden_layers))
        self.norm = make_norm(cfg)
        if cfg.norm_placement == "dyt" and cfg.dyt_embed_scale:
            # DyT does not rescale: without this the sublayers see std-0.02 embeddings (the paper's LLM recipe)
            init = math.sqrt(cfg.hidden_size) if cfg.dyt_embed_scale_init is None else cfg.dyt_embed_scale_init
            self.embed_scale = nn.Parameter(torch.full((1,), float(init)))
        self.post_init()

    def forward(self, input_ids: torch.Tensor, use_cache: bool | None = None) -> torch.Tensor:
        """``use_cache`` is accepted (and unused: no KV cache) as transformers' base models take it."""
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise DepthprobeError(f"sequence of {T} tokens is longer than max_position_embeddings")
        h = self.embed_tokens(input_ids)  # (B, T, d)
        if hasattr(self, "embed_scale"):
            h = self.embed_scale * h
        rope = rotary(self.config.hidden_size // self.config.num_attention_heads, self.config.rope_theta, T, h.device)
        for block in self.layers:
            h = block(h, rope)
        return self.norm(h)


class DepthprobeLMForCausalLM(DepthprobeLMPreTrainedModel):
    """:class:`DepthprobeLMModel` plus a linear head; ``labels`` give the mean next-token loss."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DepthprobeLMConfig):
        super().__init__(config)
        self.model = DepthprobeLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        if config.norm_placement == "deepnorm" and config.deepnorm_init:
            deepnorm_scale_init(self)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``input_ids (B, T)`` -> ``.logits (B, T, V)`` and, with ``labels``, ``.loss``.

        ``labels`` are aligned with ``input_ids`` (shifted inside, -100 ignored), as in
        transformers. There is no KV cache (``use_cache`` is accepted and ignored), and no
        padding: an ``attention_mask`` with zeros is refused.
        """
        if attention_mask is not None and not bool(attention_mask.all()):
            raise DepthprobeError("depthprobe_lm does not support padding; pass equal-length windows")
        logits = self.lm_head(self.model(input_ids))  # (B, T, V)
        loss = None
        if labels is not None:
            pred = logits[:, :-1].reshape(-1, logits.shape[-1])
            pred = pred.to(torch.promote_types(pred.dtype, torch.float32))  # bf16 logits: loss in fp32
            loss = F.cross_entropy(pred, labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


@torch.no_grad()
def deepnorm_scale_init(model: DepthprobeLMForCausalLM) -> None:
    """DeepNet's decoder init (Wang et al. 2022): value, output and MLP weights x (8L)^(-1/4).

    (DeepNet scales a Xavier init; here the scale multiplies the model's normal init.)
    """
    gain = (8 * model.config.num_hidden_layers) ** -0.25
    for block in model.model.layers:
        for linear in (block.self_attn.v_proj, block.self_attn.o_proj, *block.mlp.children()):
            linear.weight.mul_(gain)


def register_auto_classes() -> None:
    """Let ``AutoConfig`` / ``AutoModelForCausalLM`` load saved ``depthprobe_lm`` folders."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(DepthprobeLMConfig.model_type, DepthprobeLMConfig)
        AutoModelForCausalLM.register(DepthprobeLMConfig, DepthprobeLMForCausalLM)
    except ValueError:  # already registered
        pass


def build_model(spec: ModelConfig, seed: int) -> DepthprobeLMForCausalLM:
    """A freshly initialised model; the same ``seed`` gives the same weights in every
    placement (norms draw no random numbers, so linears and embeddings line up)."""
    torch.manual_seed(seed)
    return DepthprobeLMForCausalLM(DepthprobeLMConfig.from_spec(spec))
