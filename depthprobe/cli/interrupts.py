"""Ctrl-C and SIGTERM say one true thing: what finished, where it is kept, and the exact
command that continues.

A command states what an interrupt would keep (:func:`keeps`) as it goes; SIGTERM is turned
into the same ``KeyboardInterrupt`` Ctrl-C raises (:func:`start`), so both take
one path and end in one line from :func:`message`.
"""

from __future__ import annotations

import shlex
import signal
import sys

#: what the running command has kept so far, said if it is interrupted now (None: nothing)
_KEPT: dict[str, str | None] = {"what": None, "where": None}
#: the running command's arguments (set by the entry point)
_ARGV: list[str] = []


def keeps(what: str | None, where: str | None = None) -> None:
    """Record what an interrupt from here on would leave behind (``where``: its folder)."""
    _KEPT["what"], _KEPT["where"] = what, where


def resume_command(argv: list[str] | None = None, flag: str = "--resume") -> str:
    """This command line with ``--resume`` (and without ``--force``, which would delete the
    kept work), or with ``flag="--force"`` when nothing is there to continue: the exact
    command that goes on."""
    args = [a for a in (argv if argv is not None else _ARGV or sys.argv[1:]) if a not in ("--force", "--resume")]
    return "depthprobe " + shlex.join([*args, flag])


def interrupt_message(during: str, finished: str, where: str | None, progress: str | None = None,
                      argv: list[str] | None = None) -> str:
    """``interrupted during X: Y finished and is saved in DIR (Z); continue with: CMD``."""
    if where is None:
        return f"interrupted during {during}; {finished} finished, and nothing was saved (no --out)"
    kept = f"{finished} finished and is saved in {where}/"
    if progress:
        return f"interrupted during {during}; {kept}, with {progress}; continue with: {resume_command(argv)}"
    return f"interrupted during {during}; {kept}; rerun with: {resume_command(argv, '--force')}"


def message() -> str:
    """The line for an interrupt no command caught itself (during loading, say)."""
    what, where = _KEPT["what"], _KEPT["where"]
    if what is None:
        return "interrupted (Ctrl-C or SIGTERM) before anything was written; rerun the same command"
    return f"interrupted (Ctrl-C or SIGTERM); {what} is kept in {where}/; continue with: {resume_command()}"


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def start(argv: list[str] | None) -> None:
    """A command begins: nothing kept yet; from now on SIGTERM raises ``KeyboardInterrupt``
    (what finished is kept, and said, the same way as for Ctrl-C)."""
    _ARGV[:] = list(argv if argv is not None else sys.argv[1:])
    keeps(None)
    try:
        signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread (a command called from a test runner): leave it
        pass
