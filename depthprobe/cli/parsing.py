"""Option values the CLI parses: comma lists of integers, numbers or names."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from depthprobe.config import split_items
from depthprobe.errors import DepthprobeError


def parse_list(value: str | Sequence | None, flag: str, cast: Callable = str, example: str = "a,b") -> list:
    """``"2, 4,8"`` -> ``[2, 4, 8]`` (with ``cast=int``): the one comma-list parser of options.

    Empty items are skipped; a list is cast item by item; a bad item is a one-line error
    naming ``flag``.
    """
    try:
        return [cast(v) for v in split_items(value)]
    except (TypeError, ValueError) as exc:
        kind = {int: " of integers", float: " of numbers"}.get(cast, "")
        raise DepthprobeError(f"{flag} takes a comma-separated list{kind} like {example} (got {value!r})") from exc
