"""Training tokens: a text corpus -> one token stream -> windows, in a seeded order.

Default corpus: the built-in calibration text (``pydoc_data.topics``, English prose) followed
by the Python standard library's sources (sorted by path), read with a byte-level tokenizer
(ByT5 layout: token = byte + 3, vocabulary 259), so nothing is downloaded. Any HF tokenizer,
a text file, or a ``datasets`` name (streamed until ``max_tokens``) also work.

The stream is cut into non-overlapping windows of ``seq_len`` tokens. Every ``k``-th window
(spread over the whole stream) is held out for validation; the rest are the training set.
The training order is a fixed function of ``(seed, step)``: epoch ``e`` visits the windows
in ``randperm(seed, e)`` order. A batch never depends on earlier batches, so resuming at step
``s`` needs nothing but ``s``, and a comparison feeds every variant the same tokens.
"""

from __future__ import annotations

import logging
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from depthprobe.data import _tokenize_stream, builtin_text, dataset_texts, read_text_file
from depthprobe.errors import DepthprobeError

log = logging.getLogger(__name__)

BYTE_OFFSET = 3  # ByT5: ids 0, 1, 2 are pad, eos, unk; byte b is id b + 3
BYTE_VOCAB = 256 + BYTE_OFFSET
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class DataConfig:
    """Where the training tokens come from; saved with every run."""

    tokenizer: str | None = None  # None: byte-level; else an HF tokenizer name or folder
    text_file: str | None = None  # train on this file instead of the built-in corpus
    dataset: str | None = None  # datasets NAME[:CONFIG[:SPLIT]], streamed
    max_tokens: int = 4_000_000  # corpus size (train + validation); a fixed size fixes the order
    val_windows: int = 32  # held-out windows for validation loss

    def __post_init__(self):
        if self.text_file is not None and self.dataset is not None:
            raise DepthprobeError("give at most one of --text-file and --dataset")
        if self.max_tokens < 1000:
            raise DepthprobeError(f"--max-tokens must be at least 1000 (got {self.max_tokens})")
        if self.val_windows < 1:
            raise DepthprobeError(f"--val-windows must be at least 1 (got {self.val_windows})")


def byte_tokenizer():
    """The default tokenizer: bytes, saved with the model so ``load_model`` finds it."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer(extra_ids=0)


def load_tokenizer(name: str | None):
    if name is None or name == "bytes":
        return byte_tokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise DepthprobeError(
            f"cannot load tokenizer {name!r} ({str(exc).splitlines()[0][:200]}); offline, give a local folder "
            "or leave --tokenizer out for the byte-level one"
        ) from exc


def stdlib_sources(max_chars: int) -> str:
    """The Python standard library's ``.py`` files (tests and site-packages excluded), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("python3"))
        paths.extend(os.path.join(folder, f) for f in files if f.endswith(".py"))
    parts, total = [], 0
    for path in sorted(paths):
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "\n\n".join(parts)


def training_text(max_chars: int) -> str:
    """The built-in training corpus: English prose, then standard-library code."""
    prose = builtin_text()
    return prose + "\n\n" + stdlib_sources(max(0, max_chars - len(prose)))


def token_stream(config: DataConfig, tokenizer) -> tuple[torch.Tensor, str]:
    """``(ids (N,), source)``: at most ``config.max_tokens`` ids of the chosen text."""
    need = config.max_tokens
    if config.text_file is not None:
        source, text = config.text_file, read_text_file(config.text_file)
    elif config.dataset is not None:
        source = f"dataset:{config.dataset}"
        text = "\n\n".join(dataset_texts(config.dataset, min_chars=need * 5))
    else:
        source, text = "builtin+stdlib", training_text(need)
    if config.tokenizer is None or config.tokenizer == "bytes":
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)[:need].astype(np.int64) + BYTE_OFFSET
        return torch.from_numpy(ids), source
    return torch.tensor(_tokenize_stream(tokenizer, text, need)[:need], dtype=torch.long), source


class TokenData:
    """Training windows in a seeded order, plus held-out validation windows.

    Args:
        ids: the token stream ``(N,)``.
        seq_len: tokens per window ``T``.
        seed: fixes the order of the training windows.
        val_windows: how many windows to hold out (every ``k``-th window of the stream).
    """

    def __init__(self, ids: torch.Tensor, seq_len: int, seed: int, val_windows: int, source: str = "tokens"):
        n = ids.numel() // seq_len
        if n < val_windows + 2:
            raise DepthprobeError(
                f"{source} has {ids.numel()} tokens: too few for {val_windows} validation windows of {seq_len} "
                "plus training; give more text, lower --seq-len or --val-windows"
            )
        windows = ids[: n * seq_len].view(n, seq_len)
        every = n // val_windows
        is_val = torch.zeros(n, dtype=torch.bool)
        is_val[every - 1 :: every] = True
        is_val[torch.nonzero(is_val).flatten()[val_windows:]] = False
        self.val = windows[is_val]  # (val_windows, T)
        self.train = windows[~is_val]  # (n_train, T)
        self.seq_len, self.seed, self.source = seq_len, seed, source
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def num_train_windows(self) -> int:
        return self.train.shape[0]

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.num_train_windows, generator=g)}
        return self._perms[epoch]

    def batch(self, step: int, batch_size: int, rows: slice | None = None) -> torch.Tensor:
        """Rows ``rows`` of the global batch of ``step`` (0-based): ``(rows, T)`` ids."""
        rows = rows or slice(0, batch_size)
        first = step * batch_size
        picks = []
        for i in range(first + rows.start, first + rows.stop):
            epoch, pos = divmod(i, self.num_train_windows)
            picks.append(self._order(epoch)[pos])
        return self.train[torch.stack(picks)]


def load_data(config: DataConfig, seq_len: int, seed: int, tokenizer=None) -> tuple[TokenData, object]:
    """``(TokenData, tokenizer)`` for a run; the tokenizer is saved next to the model."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer)
    ids, source = token_stream(config, tokenizer)
    log.info("training corpus %s: %d tokens", source, ids.numel())
    return TokenData(ids, seq_len, seed, config.val_windows, source), tokenizer
