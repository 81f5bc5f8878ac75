"""One exception type for every mistake a user can make.

The CLI turns a :class:`DepthprobeError` into a one-line message and exit code 2; anything
else is a bug in depthprobe and keeps its traceback.
"""

from __future__ import annotations


class DepthprobeError(Exception):
    """A user-facing error: the message says what went wrong and what to do."""
