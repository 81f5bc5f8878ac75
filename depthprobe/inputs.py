"""Checks of files a user hands depthprobe, so a corrupt or mismatched input is a one-line
error (or a clean run) instead of a traceback deep in a library, or silently wrong numbers.

- :func:`check_model_files`: before transformers reads a local model folder: every
  ``*.safetensors`` file is whole (its header parses and its tensors fit in the file), a
  ``.gguf`` file starts with the GGUF magic, and the config's layer count matches the
  blocks in the weights (transformers would silently initialise missing blocks at random).
- :func:`loader_errors`: errors libraries raise on bad files (safetensors, a refused pickle)
  become :class:`DepthprobeError`.
- :func:`check_loaded`: the tokenizer fits the model's vocabulary; blocks holding NaN/inf
  weights are found by the analysis when a metric is non-finite (:func:`nonfinite_weight_blocks`).
- :func:`decode_text`: a text file in UTF-8, UTF-16/32 (with a BOM) or a legacy 8-bit encoding.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pickle
import re
import struct
import warnings
from collections.abc import Collection, Iterator
from pathlib import Path

from depthprobe.errors import DepthprobeError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
#: config keys that hold the number of blocks, by family
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
#: a block index in a weight name: model.layers.3.mlp..., transformer.h.3.attn..., encoder.layer.3...
_BLOCK_KEY = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")


def safetensors_header(path: Path) -> dict:
    """The JSON header of a ``.safetensors`` file, after checking the file holds every tensor."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise DepthprobeError(f"{path} is truncated ({size} bytes, not even a header); re-download or re-save it")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise DepthprobeError(f"{path} is truncated or not a safetensors file (header of {n} bytes in a "
                                  f"{size}-byte file); re-download or re-save it")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DepthprobeError(f"{path} has a corrupt header ({exc}); re-download or re-save it") from exc
    if not isinstance(header, dict):
        raise DepthprobeError(f"{path} has a corrupt header; re-download or re-save it")
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    if ends and 8 + n + max(ends) > size:
        raise DepthprobeError(f"{path} is truncated: its tensors need {8 + n + max(ends)} bytes but the file has "
                              f"{size}; re-download or re-save it")
    return header


def check_gguf(path: Path) -> None:
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise DepthprobeError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); "
                              "give a real .gguf file or a model folder")


def check_model_files(source: str, gguf_file: str | None = None, trust_remote_code: bool = False,
                      known_families: Collection[str] = ()) -> None:
    """See the module docs; does nothing for hub ids (nothing local to check yet). A layer
    count that disagrees with the weights is refused for ``known_families`` (one block per
    layer, by the family table) and only logged for others, which may count repeated or
    segmented stacks their own way."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return
    if not trust_remote_code:
        refuse_custom_code(folder)
    if gguf_file:
        if (folder / gguf_file).is_file():
            check_gguf(folder / gguf_file)
        return
    blocks: set[int] = set()
    for path in sorted(folder.glob("*.safetensors")):
        blocks |= {int(m.group(1)) for k in safetensors_header(path) if (m := _BLOCK_KEY.search(k))}
    config_path = folder / "config.json"
    if not blocks or not config_path.is_file():
        return
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DepthprobeError(f"{config_path} is not valid JSON ({exc}); repair or re-download it") from exc
    declared = next((config[k] for k in LAYER_COUNT_KEYS if isinstance(config.get(k), int)), None)
    found = max(blocks) + 1
    extra = config.get("num_nextn_predict_layers") or 0  # multi-token-prediction blocks stored after the stack
    if declared is None or found in (declared, declared + extra):
        return
    if config.get("model_type") not in known_families:
        log.warning("%s says %d layers but the weights hold %d blocks", config_path, declared, found)
        return
    raise DepthprobeError(
        f"{config_path} says {declared} layers but the weights in {folder} hold {found} blocks; the config "
        "belongs to another model (fix num_hidden_layers or use the matching config)"
    )


def refuse_custom_code(folder: Path) -> None:
    """A folder whose config maps to its own Python files (``auto_map``) runs that code when
    loaded: refuse unless the user asked for it."""
    try:
        auto_map = json.loads((folder / "config.json").read_text()).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return  # no readable config: transformers reports that itself
    if auto_map:
        files = sorted({str(v).split(".")[0] for v in (auto_map.values() if isinstance(auto_map, dict) else [])
                        if isinstance(v, str)})
        raise DepthprobeError(
            f"{folder} ships its own Python code ({', '.join(files) or 'auto_map'} in config.json), which loading "
            "would run; read it, then pass --trust-remote-code if you trust it"
        )


@contextlib.contextmanager
def loader_errors(source: str) -> Iterator[None]:
    """Turn a library's error about a bad weight file into a one-line :class:`DepthprobeError`."""
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol would precede our one line
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            yield
    except DepthprobeError as exc:
        if "custom code" in str(exc) and "--trust-remote-code" not in str(exc):  # a hub repo's own code
            raise DepthprobeError(f"{source} ships its own Python code, which loading would run; read it, then "
                                  "pass --trust-remote-code if you trust it") from exc
        raise
    except pickle.UnpicklingError as exc:
        raise DepthprobeError(
            f"{source}: a weight file holds more than tensors (a pickle that would run code); refused — use "
            "safetensors weights, or re-save the model from a source you trust"
        ) from exc
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        first = (str(exc).strip().splitlines() or ["unreadable"])[0][:200]
        raise DepthprobeError(f"{source}: a .safetensors file is corrupt or truncated ({first}); re-download or "
                              "re-save it") from exc


def check_loaded(model, tokenizer, source: str) -> None:
    """The tokenizer's ids fit the model's embedding. NaN/inf weights are not scanned here
    (a full read of every weight before any work): the analysis looks for them only when a
    metric comes out non-finite (:func:`nonfinite_weight_blocks`)."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embed, "num_embeddings", None)
    if tokenizer is not None and isinstance(rows, int):
        # the base vocabulary must fit; added special tokens beyond the embedding never occur in plain text
        base = getattr(tokenizer, "vocab_size", None)
        base = base if isinstance(base, int) else len(tokenizer)
        if base > rows:
            raise DepthprobeError(
                f"{source}: the tokenizer has {base} tokens but the model's embedding has {rows} rows; they "
                "belong to different models — use the model's own tokenizer"
            )
        if len(tokenizer) > rows:
            log.warning("%s: %d added tokens have no embedding row; text that spells them out would fail",
                        source, len(tokenizer) - rows)


def nonfinite_weight_blocks(stack) -> list[int]:
    """Indices of the blocks whose parameters hold NaN or inf."""
    return [i for i, block in enumerate(stack.blocks)
            if any(_nonfinite(p) for p in block.parameters())]


def _nonfinite(p) -> bool:
    """A floating-point parameter holding NaN/inf; weights offloaded by accelerate (meta
    placeholders) are not read here."""
    return p.is_floating_point() and p.device.type != "meta" and not bool(p.isfinite().all())


def require_positive_ints(obj, names, flags: bool = False) -> None:
    """Each attribute of ``obj`` in ``names`` is an ``int`` >= 1 (a bool, float or NaN is not)."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            label = f"--{name.replace('_', '-')}" if flags else name
            raise DepthprobeError(f"{label} must be a whole number of at least 1 (got {value!r})")


def require_finite(obj, names, flags: bool = False) -> None:
    """Each attribute of ``obj`` in ``names`` is a finite real number (NaN and inf pass ``x <= 0`` checks)."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            label = f"--{name.replace('_', '-')}" if flags else name
            raise DepthprobeError(f"{label} must be a finite number (got {value!r})")


def decode_text(raw: bytes, name: str) -> str:
    """Text of a file: UTF-8 (BOM optional), UTF-16/UTF-32 with a BOM, or else Latin-1 (logged)."""
    for bom, encoding in ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
                          (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):
        if raw.startswith(bom):
            try:
                return raw.decode(encoding)
            except UnicodeDecodeError as exc:
                raise DepthprobeError(f"{name} starts like {encoding} text but does not decode ({exc.reason}); "
                                      "save it as UTF-8") from exc
    if b"\x00" in raw:  # no text encoding but UTF-16/32 puts NUL bytes in text, and those have a BOM here
        raise DepthprobeError(f"{name} looks binary (or UTF-16 without a byte-order mark); give a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        log.warning("%s is not UTF-8; reading it as Latin-1", name)
        return raw.decode("latin-1")
