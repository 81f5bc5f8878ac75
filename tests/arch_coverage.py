"""Every causal-LM architecture of the installed transformers, built tiny and run end to end.

For each ``model_type`` in transformers' causal-LM auto mapping: build the model tiny from its
own config class (a few blocks, a small width, a small vocabulary), save it with a real
byte-level BPE tokenizer trained on the built-in text, load it back through
``depthprobe.load_model``, run ``analyze --metrics angular,variance,grad,drop`` and
``prune --num-layers 1`` (export included), reload the export with plain
``AutoModelForCausalLM`` and compare its loss with the pruned model's. Each architecture is
built as its config class ships it and with the defaults that choose a code path flipped
(:func:`variants`: ``is_decoder``, tied embeddings), the way users' checkpoints arrive.

    python -m tests.arch_coverage --out docs/coverage.md     # (what `make coverage` runs)

Architectures that transformers itself cannot build tiny, or that need inputs other than
``input_ids`` (encoder-decoders, audio, image-only models), are listed with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import depthprobe
from depthprobe.errors import one_line as _one_line
from depthprobe.model.stack import LayerStack
from depthprobe.prune import prune

VOCAB = 320
NUM_BLOCKS = 3
SEQS, SEQ_LEN = 2, 24
BLOCK_METRICS = ("angular_distance", "activation_variance", "grad_norm", "drop_delta_loss")

# Shrunk sizes, passed to a config class only for the keys its default instance has.
SIZES = dict(
    hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    num_hidden_layers=NUM_BLOCKS, max_position_embeddings=256, vocab_size=VOCAB,
    # mixture of experts
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
    moe_num_experts=4, moe_topk=2, num_shared_experts=1, expert_intermediate_size=32,
    # multi-head latent attention
    kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    # state-space / recurrent
    state_size=8, mamba_d_state=8, mamba_n_heads=8, mamba_d_head=16, mamba_head_dim=16, mamba_dt_rank=8,
    mamba_n_groups=1, time_step_rank=8, n_groups=1, lru_width=64, conv_L_cache=3,
    # misc widths
    linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
    num_nextn_predict_layers=0, sliding_window=16, attention_window_size=16, block_size=16,
    rotary_dim=8, partial_rotary_factor=0.5, d_ff=96, ffn_dim=96, vocab_size_per_layer_input=VOCAB,
    hidden_size_per_layer_input=16, n_input_layers=1, n_recurrent_layers=1, n_output_layers=1,
)
# the same, for configs that use the older names (attribute_map covers most of these)
ALIASES = dict(n_embd=64, n_layer=NUM_BLOCKS, n_head=4, n_inner=96, n_positions=256, d_model=64, n_layers=NUM_BLOCKS,
               num_layers=NUM_BLOCKS, n_heads=4, dim=64, d_inner=128, embed_dim=64)


@dataclass
class Row:
    """One architecture's outcome; ``stage`` is where it stopped ('ok' when it passed)."""

    model_type: str
    buildable: bool = False
    stage: str = "build"
    reason: str = ""
    family: str = ""
    blocks: int = 0
    sublayers: str = ""
    metrics: dict = field(default_factory=dict)
    analyze_ok: bool = False
    prune_ok: bool = False
    notes: list = field(default_factory=list)
    seconds: float = 0.0


def causal_lm_types(with_variants: bool = True) -> list[str]:
    """Every causal-LM ``model_type`` of the installed transformers (and its variants)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    return [v for t in names for v in variants(t)] if with_variants else names


def _spread(values: list, n: int) -> list:
    """``n`` items of a per-layer list, keeping every distinct value (hybrid patterns)."""
    picked: list[int] = []
    for i, v in enumerate(values):
        if v not in [values[j] for j in picked]:
            picked.append(i)
    picked = picked[:n]
    for i in range(len(values)):
        if len(picked) >= n:
            break
        if i not in picked:
            picked.append(i)
    return [values[i] for i in sorted(picked)]


def _shrink_kwargs(default) -> dict:
    have = default.to_dict()
    amap = getattr(default, "attribute_map", {}) or {}
    kw = {}
    for key, value in {**SIZES, **ALIASES}.items():
        if key in have or key in amap:
            kw[key] = value
    if "qk_rope_head_dim" in have:  # multi-head latent attention derives its head_dim
        kw.pop("head_dim", None)
    n_default = getattr(default, "num_hidden_layers", None)
    for key, value in have.items():
        if isinstance(value, list) and n_default and len(value) == n_default and key not in kw:
            kw[key] = _spread(value, NUM_BLOCKS)
        elif isinstance(value, dict) and key.endswith("_config"):
            sub = getattr(default, key, None)
            if sub is not None and hasattr(sub, "to_dict"):
                kw[key] = {**value, **_shrink_kwargs(sub)}
    return kw


def variants(model_type: str) -> list[str]:
    """The config defaults that choose a code path, varied the way users' checkpoints arrive:
    ``model_type`` as its config class ships it, plus ``+decoder`` (``is_decoder`` flipped on
    where the default is off: BERT-likes build their causal-LM head only then) and ``+untied``
    / ``+tied`` (``tie_word_embeddings`` flipped)."""
    from transformers import CONFIG_MAPPING

    try:
        have = CONFIG_MAPPING[model_type]().to_dict()
    except Exception:  # noqa: BLE001 - tiny_config says why
        return [model_type]
    out = [model_type]
    if have.get("is_decoder") is False:
        out.append(f"{model_type}+decoder")
    if "tie_word_embeddings" in have:
        out.append(f"{model_type}+{'untied' if have['tie_word_embeddings'] else 'tied'}")
    return out


def tiny_config(model_type: str):
    """The tiny config of ``model_type`` (``name+decoder`` / ``name+tied`` / ``name+untied``:
    that default flipped, see :func:`variants`)."""
    from transformers import CONFIG_MAPPING

    model_type, *flips = model_type.split("+")
    config_cls = CONFIG_MAPPING[model_type]
    try:
        default = config_cls()
        config = config_cls(**_shrink_kwargs(default))
    except Exception as exc:  # noqa: BLE001 - config validation raises anything
        raise Unsupported(f"its config cannot be shrunk: {_one_line(exc)}") from exc
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= VOCAB:
            setattr(config, key, 1)
    if "decoder" in flips:
        config.is_decoder = True
    if "tied" in flips or "untied" in flips:
        config.tie_word_embeddings = "tied" in flips
        if hasattr(config, "get_text_config"):
            config.get_text_config().tie_word_embeddings = "tied" in flips
    if getattr(config, "is_encoder_decoder", False):
        raise Unsupported("encoder-decoder (needs decoder inputs)")
    return config


class Unsupported(Exception):
    """transformers cannot build this architecture tiny, or it does not run on input_ids alone."""


def build_tiny(model_type: str, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    try:
        with torch.device("meta"):  # count parameters before paying for a real build
            n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        if n_params > 20_000_000:
            raise Unsupported(f"not tiny: {n_params / 1e6:.0f}M parameters after shrinking the config")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    except Unsupported:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers raises anything here
        raise Unsupported(f"from_config fails: {_one_line(exc)}") from exc
    model.eval()
    ids = torch.randint(2, VOCAB, (1, 8))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=False)
        if getattr(out, "logits", None) is None:
            raise Unsupported("its output has no logits")
    except Unsupported:
        raise
    except Exception as exc:  # noqa: BLE001
        raise Unsupported(f"does not run on input_ids alone: {_one_line(exc)}") from exc
    return model


_TOKENIZER = None


def tokenizer():
    """A byte-level BPE tokenizer of ``VOCAB`` tokens trained on the built-in text (seconds, in memory)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        from depthprobe.data import builtin_text

        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator([builtin_text()[:200_000]], trainer)
        _TOKENIZER = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                             pad_token="</s>")
    return _TOKENIZER


_WINDOWS = None


def calibration_windows():
    """``SEQS`` windows of ``SEQ_LEN`` tokens of the built-in text (tokenized once)."""
    global _WINDOWS
    if _WINDOWS is None:
        from depthprobe.data import make_windows

        _WINDOWS = make_windows(tokenizer(), num_sequences=SEQS, seq_len=SEQ_LEN)
    return _WINDOWS


def _loss(model, ids: torch.Tensor) -> float:
    from depthprobe.probes import metrics as M

    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    nll, count = M.next_token_nll_sum(logits, ids)
    return float(nll) / count


def check(model_type: str, workdir: Path) -> Row:
    """Build, save, analyze, prune, export, reload: one architecture end to end."""
    row = Row(model_type)
    t0 = time.perf_counter()
    try:
        model = build_tiny(model_type)
    except Unsupported as exc:
        row.reason = str(exc)
        row.seconds = time.perf_counter() - t0
        return row
    row.buildable = True
    try:
        row.stage = "save"
        folder = workdir / model_type
        model.save_pretrained(folder)
        tokenizer().save_pretrained(folder)
        del model
        row.stage = "load"
        model, tok = depthprobe.load_model(str(folder), device="cpu")
        stack = LayerStack.from_model(model)
        row.family, row.blocks = stack.family, len(stack)
        row.sublayers = stack.describe_sublayers() if hasattr(stack, "describe_sublayers") else ""
        row.stage = "analyze"
        windows = calibration_windows()
        result = depthprobe.analyze(model, windows=windows, metrics="angular,variance,grad,drop", progress=False,
                                    batch_size=SEQS, options={"block_sizes": (), "bootstrap_samples": 20})
        layers = result.layers
        row.notes = list(result.summary.get("notes", []))
        row.metrics = {c: bool(np.isfinite(layers[c]).all()) for c in layers.columns if c != "layer"}
        bad = [c for c in BLOCK_METRICS if c not in layers or not np.isfinite(layers[c]).all()]
        if bad:
            raise AssertionError(f"block metrics not finite: {', '.join(bad)}")
        row.analyze_ok = True
        row.stage = "prune"
        out = workdir / f"{model_type}-pruned"
        pruned = _prune_one(model, tokenizer(), windows, out, row)  # the saved one; its text ids are cached
        row.stage = "reload"
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
        ids = windows.input_ids
        want, got = _loss(model, ids), _loss(reloaded, ids)
        if not math.isclose(want, got, rel_tol=1e-4, abs_tol=1e-4) or not math.isclose(
            got, pruned.loss_after, rel_tol=1e-4, abs_tol=1e-4
        ):
            raise AssertionError(f"reloaded export loss {got:.6f} != pruned {want:.6f} / {pruned.loss_after:.6f}")
        row.prune_ok = True
        row.stage = "ok"
    except Exception as exc:  # noqa: BLE001 - the table records every failure
        row.reason = _one_line(exc)
        if row.stage == "save" or (row.stage == "load" and not _plain_reload_works(workdir / model_type)):
            row.buildable = False  # transformers cannot save or reload its own tiny model either
            row.reason = f"transformers cannot {row.stage} its own tiny model: {row.reason}"
        if os.environ.get("COVERAGE_TRACEBACK"):
            print(traceback.format_exc(), file=sys.__stderr__)
    row.seconds = time.perf_counter() - t0
    return row


def _plain_reload_works(folder: Path) -> bool:
    from transformers import AutoModelForCausalLM

    try:
        AutoModelForCausalLM.from_pretrained(folder)
    except Exception:  # noqa: BLE001 - any failure means transformers cannot round-trip it
        return False
    return True


def _prune_one(model, tok, windows, out: Path, row: Row):
    """``prune --num-layers 1`` (drop strategy); if the config refuses the pruned model (a
    hybrid that needs at least one attention block), the next-least-harmful block instead."""
    kwargs = dict(curve=False, windows=windows, out_dir=out, progress=False, batch_size=SEQS,
                  options={"bootstrap_samples": 20})
    try:
        return prune(model, tok, num_layers=1, strategy="drop", **kwargs)
    except depthprobe.DepthprobeError as exc:
        if not ("would be invalid" in str(exc) or "rebuilds" in str(exc)):
            raise
        refused = exc
    for block in range(len(LayerStack.from_model(model)) - 1, -1, -1):  # the library refused before any change
        try:
            result = prune(model, tok, remove=[block], **kwargs)
        except depthprobe.DepthprobeError:
            continue
        row.notes.append(f"first choice refused ({_one_line(refused)}); removed block {block}")
        return result
    raise refused


def run_all(types: list[str] | None = None, verbose: bool = False) -> list[Row]:
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="depthprobe-coverage-") as tmp:
        for model_type in types or causal_lm_types():
            sink = io.StringIO()
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                row = check(model_type, Path(tmp))
            rows.append(row)
            if verbose:
                print(f"{model_type:28s} {row.stage:8s} {row.seconds:5.1f}s {row.sublayers:30s} {row.reason}",
                      flush=True)
            for child in Path(tmp).iterdir():
                _rmtree(child)
    return rows


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def markdown(rows: list[Row], seconds: float) -> str:
    """The coverage table (docs/coverage.md): passing, failing and unbuildable architectures."""
    import transformers

    built = [r for r in rows if r.buildable]
    passed = [r for r in built if r.stage == "ok"]
    lines = [
        "# Architecture coverage",
        "",
        f"Generated by `make coverage` (`python -m tests.arch_coverage`) with transformers "
        f"{transformers.__version__}, torch {torch.__version__}, in {seconds:.0f} s on CPU.",
        "",
        f"Every causal-LM architecture in transformers' auto mapping is built tiny from its own config class "
        f"({len(rows)} builds: each as its config ships, and with `is_decoder` / `tie_word_embeddings` flipped, "
        f"`+decoder`, `+tied`, `+untied`; {NUM_BLOCKS} blocks, width 64, a {VOCAB}-token byte-level BPE "
        "tokenizer), saved, "
        "loaded with `depthprobe.load_model`, analyzed with `angular,variance,grad,drop` and pruned by one "
        "block (`prune --num-layers 1`, drop strategy); the export is reloaded with plain "
        "`AutoModelForCausalLM` and must reproduce the pruned model's loss.",
        "",
        f"**{len(passed)} of {len(built)} tiny-buildable architectures pass "
        f"({100 * len(passed) / max(len(built), 1):.1f}%).** {len(rows) - len(built)} cannot be built tiny "
        "or do not run on `input_ids` alone (listed at the end).",
        "",
        "Sublayers: `attn` attention, `mlp` MLP or MoE, `mixer` a state-space / recurrent token mixer "
        "(no attention columns); `k/n` when only k of the n blocks have one. Sublayer metrics are "
        "`grad_norm_*` and `drop_delta_loss_*` (finite where the block has that sublayer).",
        "",
        "| architecture | family | sublayers | block metrics | sublayer metrics | router | prune/export | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in built:
        sub = [c for c in ("grad_norm_attn", "grad_norm_mlp", "drop_delta_loss_attn", "drop_delta_loss_mlp")
               if r.metrics.get(c)]
        block = "finite" if r.analyze_ok else f"fails ({r.stage})"
        prune_cell = "ok" if r.prune_ok else ("-" if not r.analyze_ok else "fails")
        note = r.reason if r.stage != "ok" else "; ".join(n for n in r.notes if "first choice" in n)
        router = "yes" if "router_load_entropy" in r.metrics else ""
        lines.append(f"| {r.model_type} | {r.family} | {r.sublayers} | {block} | {len(sub)}/4 | {router} | "
                     f"{prune_cell} | {note.replace('|', '/')} |")
    lines += ["", "## Not built tiny (the reason)", "",
              "Encoder-decoders and models that need other inputs are out of scope. The others fail while "
              "building: some inside transformers itself, some because this harness's generic shrinking "
              "(a few blocks, width 64) breaks a constraint of that config (\"cannot be shrunk\", size "
              "mismatches); those are limits of the harness, not verdicts on depthprobe.", "",
              "| architecture | why |", "|---|---|"]
    for r in rows:
        if not r.buildable:
            lines.append(f"| {r.model_type} | {r.reason.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the markdown table here (docs/coverage.md)")
    parser.add_argument("--only", default=None, help="comma-separated model types")
    args = parser.parse_args()
    types = args.only.split(",") if args.only else None
    t0 = time.perf_counter()
    rows = run_all(types, verbose=True)
    built = [r for r in rows if r.buildable]
    passed = [r for r in built if r.stage == "ok"]
    seconds = time.perf_counter() - t0
    print(f"{len(passed)}/{len(built)} tiny-buildable pass ({len(rows)} causal-LM types), {seconds:.0f}s")
    if args.out:
        Path(args.out).write_text(markdown(rows, seconds))


if __name__ == "__main__":
    main()
