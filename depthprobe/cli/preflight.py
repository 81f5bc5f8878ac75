"""Every check that needs no forward pass, in one place per command, before anything heavy.

The rule: an error that the options, the files, the model's config or its tokenizer can
reveal appears before the first weight is read. Three stages, each as early as it can be:

1. :func:`check_options` and the ``check_*_options`` of each command: the options alone
   (ranges, lists, metric names, files that must exist and hold text). No torch import.
2. :func:`check_config` and :func:`check_prune_config`: against the model's config
   (positions, block count, the repair map's token budget), read before any weight.
3. :func:`calibration_windows`: the calibration text tokenized (too little text, too many
   positions), with the tokenizer only; the windows are then handed to the command.
"""

from __future__ import annotations

from pathlib import Path

from depthprobe.cli.choices import ALL_METRICS, DEVICE_MAPS, REPAIR_VAL_FRACTION
from depthprobe.cli.parsing import parse_list
from depthprobe.errors import DepthprobeError


def check_text_file(path: str | None, flag: str) -> None:
    """A text option names an existing file that holds text (decoded as the loaders do)."""
    if path is None:
        return
    from depthprobe.inputs import decode_text

    p = Path(path).expanduser()
    if not p.is_file():
        raise DepthprobeError(f"{flag}: text file not found: {path}")
    if not decode_text(p.read_bytes(), str(path)).strip():
        raise DepthprobeError(f"{flag} {path} is empty; give a file with at least a few thousand words")


def at_least(opts: dict, minimums: dict[str, int]) -> None:
    """``--name`` options (dict keys with ``_`` for ``-``) at or above their minimum."""
    for key, low in minimums.items():
        value = opts.get(key)
        if value is not None and value < low:
            raise DepthprobeError(f"--{key.replace('_', '-')} must be at least {low} (got {value})")


def check_metrics(value: str) -> tuple[str, ...]:
    """``--metrics`` parsed, every name known (the closest one suggested for a typo)."""
    import difflib

    names = tuple(dict.fromkeys(parse_list(value, "--metrics")))
    if not names:
        raise DepthprobeError("--metrics is empty; e.g. --metrics angular,variance,grad")
    for name in names:
        if name not in ALL_METRICS:
            close = difflib.get_close_matches(name, ALL_METRICS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise DepthprobeError(f"unknown metric {name!r}; {hint}choose from {', '.join(ALL_METRICS)}")
    return names


def check_options(opts: dict) -> None:
    """The calibration options every model command shares (``data_options``)."""
    at_least(opts, {"num_sequences": 1, "seq_len": 2, "batch_size": 1})
    if opts.get("text_file") and opts.get("dataset"):
        raise DepthprobeError("give at most one of --text-file and --dataset")
    check_text_file(opts.get("text_file"), "--text-file")
    if opts.get("device_map") is not None and opts["device_map"] not in DEVICE_MAPS:
        raise DepthprobeError(f"unknown --device-map {opts['device_map']!r}; choose one of {', '.join(DEVICE_MAPS)}")
    if opts.get("resume") and not opts.get("out_dir"):
        raise DepthprobeError("--resume needs --out (the folder of the interrupted run)")


def check_labels(opts: dict, metrics: tuple[str, ...]) -> str:
    """``--labels`` with ``--metrics probe`` (each needs the other), read against the windows."""
    from depthprobe.labels import read_labels

    if "probe" not in metrics:
        raise DepthprobeError("--labels is read by --metrics probe; add probe to --metrics")
    if not opts["labels_file"]:
        raise DepthprobeError("--metrics probe on a text model needs --labels FILE "
                              "(a CSV with window[,position] and label columns)")
    read_labels(opts["labels_file"], opts["num_sequences"], opts["seq_len"])
    return opts["labels_file"]


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _first_int(config, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def num_blocks(config) -> int | None:
    return _first_int(text_config(config), ("num_hidden_layers", "n_layer", "num_layers"))


def max_positions(config) -> int | None:
    return _first_int(text_config(config), ("max_position_embeddings", "n_positions", "max_sequence_length"))


def check_config(opts: dict, config) -> None:
    """Options against the model's config: windows no longer than its positions; ``--execution
    layer`` only for blocks that can run one at a time."""
    limit = max_positions(config)
    if limit is not None and opts.get("seq_len", 0) > limit:
        raise DepthprobeError(f"--seq-len {opts['seq_len']} is longer than this model allows ({limit} positions); "
                              "lower it")
    if opts.get("execution") == "layer":
        from depthprobe.probes.offload import layer_major_refusal

        name = (getattr(config, "architectures", None) or [getattr(config, "model_type", "this model")])[0]
        refusal = layer_major_refusal(config, name)
        if refusal:
            raise DepthprobeError(refusal)


def calibration_windows(opts: dict, tokenizer, config):
    """The calibration windows, made with the tokenizer before the weights load (so too little
    text fails here)."""
    from depthprobe.data import make_windows

    return make_windows(tokenizer, num_sequences=opts["num_sequences"], seq_len=opts["seq_len"],
                        text_file=opts.get("text_file"), dataset=opts.get("dataset"),
                        max_positions=max_positions(config))


def check_prune_options(opts: dict) -> list[int] | None:
    """``prune``'s own options; returns ``--remove`` parsed (None with ``--num-layers``)."""
    remove = parse_list(opts["remove"], "--remove", int, "21,22,23") if opts["remove"] is not None else None
    if (remove is None) == (opts["num_layers"] is None):
        raise DepthprobeError("give either --remove LAYERS or --num-layers K")
    at_least(opts, {"heldout_windows": 1, "repair_windows": 2, "heal_steps": 1, "heal_rank": 1, "eval_limit": 1,
                    "bench_new_tokens": 1, "bench_repeats": 1, "curve_max": 1})
    if opts["heal_lr"] is not None and not opts["heal_lr"] > 0:
        raise DepthprobeError(f"--heal-lr must be positive (got {opts['heal_lr']})")
    ridges = parse_list(opts["repair_ridge"], "--repair-ridge", float, "0.001,0.01")
    if not ridges or min(ridges) < 0:
        raise DepthprobeError(f"--repair-ridge takes ridges >= 0 (got {opts['repair_ridge']!r})")
    for flag in ("bench_batch_sizes", "bench_prompt_lens"):
        values = parse_list(opts[flag], f"--{flag.replace('_', '-')}", int, "1,4")
        if not values or min(values) < 1:
            raise DepthprobeError(f"--{flag.replace('_', '-')} takes positive integers (got {opts[flag]!r})")
    if opts["eval_text_file"] and opts["eval_dataset"]:
        raise DepthprobeError("give at most one of --eval-text-file and --eval-dataset")
    check_text_file(opts["eval_text_file"], "--eval-text-file")
    check_text_file(opts["heal_text_file"], "--heal-text-file")
    return remove


def check_prune_config(opts: dict, config, remove: list[int] | None) -> None:
    """``prune``'s options against the config: blocks that exist, a K that leaves one, and
    the repair map's token budget (a d x d map needs at least d fit tokens)."""
    blocks = num_blocks(config)
    if blocks is not None:
        if remove is not None:
            bad = sorted({i for i in remove if not 0 <= i < blocks})
            if bad:
                raise DepthprobeError(f"--remove {','.join(map(str, bad))} is out of range: this model has blocks "
                                      f"0..{blocks - 1}")
            if len(set(remove)) >= blocks:
                raise DepthprobeError(f"cannot remove all {blocks} blocks; keep at least one")
        elif not 1 <= opts["num_layers"] <= blocks - 1:
            raise DepthprobeError(f"--num-layers must be between 1 and {blocks - 1} for this {blocks}-block model")
    if opts["repair"]:
        check_repair_budget(opts, config)


def repair_fit_tokens(num_windows: int, seq_len: int) -> int:
    """Tokens the repair maps are fit on: the windows less the validated fifth."""
    return (num_windows - int(round(num_windows * REPAIR_VAL_FRACTION))) * seq_len


def check_repair_budget(opts: dict, config) -> None:
    """The windows repair fits on (``max(--repair-windows, --num-sequences)``, the last fifth
    validating) hold at least ``d`` tokens for a ``d x d`` map."""
    text = text_config(config)
    d = _first_int(text, ("hidden_size", "n_embd", "d_model"))
    n = max(opts["repair_windows"], opts["num_sequences"])
    n_val = int(round(n * REPAIR_VAL_FRACTION))
    if n_val < 1 or n_val >= n:
        raise DepthprobeError(f"repair needs at least 2 windows to fit and validate (got {n}); raise --repair-windows")
    if d is None or repair_fit_tokens(n, opts["seq_len"]) >= d:
        return
    need = next(k for k in range(n, 100 * d) if repair_fit_tokens(k, opts["seq_len"]) >= d)
    raise DepthprobeError(f"repair fits a {d}x{d} map and needs at least {d} fit tokens; {n} windows of "
                          f"{opts['seq_len']} give {repair_fit_tokens(n, opts['seq_len'])} (a fifth validates): "
                          f"pass --repair-windows {need} or a longer --seq-len")


def check_shrink_config(opts: dict, config) -> None:
    """``shrink --target-params`` against the config, before any weight is read: a fraction
    below what the embeddings, head and norms alone take would remove every block."""
    if opts.get("target_params") is None:
        return
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - no causal-LM class for this config: shrink refuses it after loading
        return
    from depthprobe.model.stack import LayerStack

    try:
        blocks = LayerStack.from_model(model, opts.get("layers_path")).blocks
    except DepthprobeError:
        return
    total = sum(p.numel() for p in model.parameters())
    outside = total - sum(p.numel() for p in blocks.parameters())
    if opts["target_params"] * total <= outside:
        raise DepthprobeError(
            f"--target-params {opts['target_params']} would remove every block: the embeddings, head and norms alone "
            f"are {outside / total:.4f} of this model's {total:,} parameters and at least one block stays; "
            "ask for a larger fraction")
