"""One exception type for every mistake a user can make.

The CLI turns a :class:`DepthprobeError` into a one-line message and exit code 2; anything
else is a bug in depthprobe and keeps its traceback.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path


class DepthprobeError(Exception):
    """A user-facing error: the message says what went wrong and what to do."""


def one_line(exc: BaseException, width: int = 160) -> str:
    """``"ValueError: first line of the message"`` (cut at ``width`` characters; the type's name
    stands in for an empty message)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {(text[0] if text else type(exc).__name__)[:width]}"


#: what a model's own forward raises when it cannot run with some blocks skipped
MODEL_FORWARD_ERRORS = (RuntimeError, ValueError, IndexError, KeyError)


def raised_by_depthprobe(exc: BaseException) -> bool:
    """Whether the innermost Python frame of ``exc`` is depthprobe's own code (not the model's,
    transformers' or torch's)."""
    frames = traceback.extract_tb(exc.__traceback__)
    package = str(Path(__file__).resolve().parent)  # this file is depthprobe/errors.py
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(package + os.sep)


def refused_by_model(exc: BaseException) -> bool:
    """Whether ``exc`` is the model's own forward refusing to run (one of
    :data:`MODEL_FORWARD_ERRORS`, raised outside depthprobe), not a depthprobe bug."""
    return isinstance(exc, MODEL_FORWARD_ERRORS) and not raised_by_depthprobe(exc)
