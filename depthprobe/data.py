"""Calibration data: text -> one token stream -> ``N`` consecutive windows of ``T`` tokens.

Sources: the built-in corpus (``pydoc_data.topics``, English prose shipped with every
Python, about 110k SmolLM2 tokens), a text file, or a ``datasets`` dataset given as
``NAME[:CONFIG[:SPLIT]]`` (a hub name, or a local folder of .txt/.json/.csv files).
The stream is tokenized without special tokens; windows are deterministic (the first
``N*T`` tokens), so two runs on the same text see the same tokens.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from depthprobe.config import DEFAULT_NUM_SEQUENCES, DEFAULT_SEQ_LEN
from depthprobe.errors import DepthprobeError
from depthprobe.inputs import decode_text

log = logging.getLogger(__name__)

BUILTIN = "builtin"


def builtin_text() -> str:
    """The built-in calibration corpus: every ``pydoc_data.topics`` entry, in sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_text_file(path: str | Path) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DepthprobeError(f"text file not found: {path}")
    text = decode_text(p.read_bytes(), str(path))  # UTF-8, UTF-16/32 with a BOM, or Latin-1
    if not text.strip():
        raise DepthprobeError(f"text file {path} is empty; give a file with at least a few thousand words")
    return text


def dataset_texts(spec: str, min_chars: int):
    """Yield texts from ``NAME[:CONFIG[:SPLIT]]`` until about ``min_chars`` characters."""
    try:
        import datasets
    except ImportError as exc:
        raise DepthprobeError("--dataset needs the `datasets` package: pip install datasets") from exc
    name, config, split = (spec.split(":") + [None, None])[:3]
    local = Path(name).expanduser()
    try:
        if local.is_dir():
            ds = datasets.load_dataset(str(local), split=split or "train", streaming=True)
        else:
            ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as exc:
        raise DepthprobeError(
            f"cannot load dataset {spec!r}: {str(exc).splitlines()[0][:200]}; offline, use --text-file or "
            "a local folder of .txt/.json files"
        ) from exc
    total = 0
    column = None
    for row in ds:
        if column is None:
            column = "text" if "text" in row else next((k for k, v in row.items() if isinstance(v, str)), None)
            if column is None:
                raise DepthprobeError(f"dataset {spec!r} has no text column (columns: {', '.join(row)})")
        text = row[column]
        if text:
            yield text
            total += len(text)
            if total >= min_chars:
                return


@dataclass(frozen=True)
class Windows:
    """``input_ids`` of shape ``(N, T)`` plus where they came from."""

    input_ids: torch.Tensor
    source: str

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def batches(self, batch_size: int):
        for start in range(0, self.num_sequences, batch_size):
            yield self.input_ids[start : start + batch_size]


def make_windows(
    tokenizer,
    *,
    num_sequences: int = DEFAULT_NUM_SEQUENCES,
    seq_len: int = DEFAULT_SEQ_LEN,
    text: str | None = None,
    text_file: str | Path | None = None,
    dataset: str | None = None,
    max_positions: int | None = None,
) -> Windows:
    """Tokenize the chosen text as one stream and cut ``num_sequences`` windows of ``seq_len``.

    Exactly one of ``text``, ``text_file``, ``dataset`` may be given; none means built-in.
    """
    _check_shape(num_sequences, seq_len, max_positions, what="")
    if sum(x is not None for x in (text, text_file, dataset)) > 1:
        raise DepthprobeError("give at most one of --text-file and --dataset")
    need = num_sequences * seq_len
    if text_file is not None:
        source, text = str(text_file), read_text_file(text_file)
    elif dataset is not None:
        source = f"dataset:{dataset}"
        # ~4 characters per token is generous for English; take a margin and re-check below.
        text = "\n\n".join(dataset_texts(dataset, min_chars=need * 8))
    elif text is not None:
        source = "text"
    else:
        source, text = BUILTIN, builtin_text()
    if not text.strip():
        raise DepthprobeError(f"no text in {source}; give a non-empty text file or dataset")
    ids = _tokenize_stream(tokenizer, text, need)
    if len(ids) < need:
        raise DepthprobeError(
            f"{source} has {len(ids)} tokens but {num_sequences} windows of {seq_len} need {need}; "
            "give more text or lower --num-sequences / --seq-len"
        )
    return Windows(torch.tensor(ids[:need], dtype=torch.long).view(num_sequences, seq_len), source)


def _chunk_chars(need: int) -> int:
    return max(200_000, need * 8)


def _tokenize_stream(tokenizer, text: str, need: int, chunk_chars: int | None = None) -> list[int]:
    """Token ids of ``text`` with no special tokens, stopping once ``need`` ids are there.

    Long texts are tokenized in paragraph-aligned chunks so a 100 MB file costs only what
    the windows use; chunk boundaries fall on blank lines, where BPE merges do not cross.
    ``chunk_chars`` (default from ``need``) fixes the chunking, so a longer read of the
    same text starts with exactly the ids a shorter one gave.
    """
    chunk_chars = chunk_chars or _chunk_chars(need)
    ids: list[int] = []
    pos = 0
    while pos < len(text) and len(ids) < need:
        end = min(len(text), pos + chunk_chars)
        if end < len(text):
            cut = text.rfind("\n\n", pos, end)
            end = cut + 2 if cut > pos else end
        ids.extend(tokenizer(text[pos:end], add_special_tokens=False)["input_ids"])
        pos = end
    return ids


#: per tokenizer object, the ids of whole texts already read (see :func:`_whole_text_ids`)
_WHOLE_TEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _whole_text_ids(tokenizer, text: str, chunk_chars: int) -> tuple[int, ...]:
    """Every id of ``text`` (:func:`_tokenize_stream` with this chunking), cached per tokenizer.

    The held-out tail is read from the whole text, and prune, shrink and their curves ask
    for it several times in one run; the key holds the text's hash and the tokenizer's
    size, so a tokenizer given new tokens reads the text again.
    """
    key = (hash(text), len(text), chunk_chars, len(tokenizer))
    try:
        cache = _WHOLE_TEXTS.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no cache
        return tuple(_tokenize_stream(tokenizer, text, need=len(text) + 1, chunk_chars=chunk_chars))
    if key not in cache:
        if len(cache) >= 4:
            cache.pop(next(iter(cache)))
        cache[key] = tuple(_tokenize_stream(tokenizer, text, need=len(text) + 1, chunk_chars=chunk_chars))
    return cache[key]


def heldout_windows(
    tokenizer,
    *,
    num_sequences: int,
    seq_len: int,
    calibration: Windows | None = None,
    text_file: str | None = None,
    dataset: str | None = None,
    max_positions: int | None = None,
) -> Windows:
    """Windows for scoring a pruned model on text that did not choose its layers.

    With no text option: the **last** ``num_sequences * seq_len`` tokens of the built-in
    text, which the calibration windows (the first ``N_cal * T_cal`` tokens when they
    come from the built-in text) never touch; this is asserted on token positions, and
    a text too short for both is a one-line error. The slice does not move with the
    calibration size, so held-out losses of different runs are comparable.

    With ``text_file`` / ``dataset``: windows of that text (its first tokens). When it
    is the very text the calibration windows came from, the windows are taken from its
    end, disjoint from the calibration ones (a file), or refused (a dataset: give
    another split).
    """
    if text_file is not None and dataset is not None:
        raise DepthprobeError("give at most one of --eval-text-file and --eval-dataset")
    cal_source = calibration.source if calibration is not None else None
    if dataset is not None and cal_source == f"dataset:{dataset}":
        raise DepthprobeError(
            f"--eval-dataset {dataset} is the calibration dataset; give another split, e.g. NAME:CONFIG:test"
        )
    if text_file is None and dataset is None:
        source, text = BUILTIN, builtin_text()
    elif text_file is not None and cal_source is not None and _same_file(text_file, cal_source):
        source, text = str(text_file), read_text_file(text_file)
    else:
        windows = make_windows(tokenizer, num_sequences=num_sequences, seq_len=seq_len, text_file=text_file,
                               dataset=dataset, max_positions=max_positions)
        return Windows(windows.input_ids, f"heldout:{windows.source}")
    _check_shape(num_sequences, seq_len, max_positions)
    return _disjoint_tail(tokenizer, text, source, num_sequences, seq_len,
                          calibration if cal_source == source else None)


def _same_file(path: str, source: str) -> bool:
    try:
        return Path(path).expanduser().resolve() == Path(source).expanduser().resolve()
    except OSError:
        return False


def _check_shape(num_sequences: int, seq_len: int, max_positions: int | None, what: str = "held-out ") -> None:
    """One-line errors for a window count or length no model can use (``what`` names the windows)."""
    if num_sequences < 1:
        raise DepthprobeError(f"{what}--num-sequences must be at least 1 (got {num_sequences})")
    if seq_len < 2:
        raise DepthprobeError(f"{what}--seq-len must be at least 2 tokens (got {seq_len})")
    if max_positions is not None and seq_len > max_positions:
        raise DepthprobeError(
            f"{what}--seq-len {seq_len} is longer than this model allows ({max_positions} positions); lower it"
        )


def _disjoint_tail(tokenizer, text: str, source: str, num_sequences: int, seq_len: int,
                   calibration: Windows | None) -> Windows:
    """The last ``N*T`` tokens of ``text``, asserted disjoint from ``calibration`` (its first tokens)."""
    need = num_sequences * seq_len
    cal_need = calibration.input_ids.numel() if calibration is not None else 0
    # the calibration's own chunking, so the stream's first ``cal_need`` ids are exactly its ids
    ids = _whole_text_ids(tokenizer, text, _chunk_chars(cal_need))
    start = len(ids) - need
    if start < cal_need:
        raise DepthprobeError(
            f"{source} has {len(ids)} tokens: {cal_need} calibration and {need} held-out tokens do not both fit; "
            "lower --num-sequences / --seq-len, give --eval-text-file, or --no-heldout"
        )
    if calibration is not None and not torch.equal(
        calibration.input_ids.flatten().cpu(), torch.tensor(ids[:cal_need], dtype=torch.long)
    ):
        raise DepthprobeError(
            f"calibration windows do not match the start of {source}; pass held-out text with --eval-text-file"
        )
    held = torch.tensor(ids[start:], dtype=torch.long).view(num_sequences, seq_len)
    log.info("held-out windows: tokens %d..%d of %s (calibration: 0..%d)", start, len(ids), source, cal_need)
    return Windows(held, f"heldout:{source}[{start}:{len(ids)}]")
