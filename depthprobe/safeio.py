"""Writing outputs so that a crash, a kill or a full disk never costs what was written before.

- :func:`atomic_write` and friends write to a temporary file in the same folder, ``fsync``
  it, then ``os.replace`` it over the target: a reader (or a resumed run) sees the old file
  or the new one, never half of one.
- :func:`atomic_save_pretrained` does the same for ``save_pretrained`` folders, file by file.
- A full disk (``ENOSPC``, ``EDQUOT``) or a file-size limit (``EFBIG``) becomes a one-line
  :class:`DepthprobeError` naming the file; the temporary file is removed and the previous
  complete output is left as it was.
- :func:`out_lock` makes one command at a time own an ``--out`` folder: a lock file
  (``.depthprobe.lock``, holding pid, host and command) locked with ``fcntl.flock``. The
  kernel drops a flock when its process dies, so a killed run never leaves the folder stuck;
  the next run takes it over and removes the temporary files the dead one left.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import pickle
import re
import shutil
import socket
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from depthprobe.errors import DepthprobeError

log = logging.getLogger(__name__)

LOCK_NAME = ".depthprobe.lock"
TMP_MARK = ".tmp-"
#: out of space, over quota, over the file-size limit: the disk, not depthprobe, said no
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _errno(exc: BaseException) -> int | None:
    """The OS error number of ``exc``; Rust writers (safetensors) only say "(os error N)"."""
    if isinstance(exc, OSError):
        return exc.errno
    found = re.search(r"\(os error (\d+)\)", str(exc))
    return int(found.group(1)) if found else None


def is_disk_full(exc: BaseException) -> bool:
    return _errno(exc) in DISK_ERRNOS


def disk_full_error(exc: BaseException, path: str | Path) -> DepthprobeError:
    code = _errno(exc)
    reason = os.strerror(code) if code else str(exc)
    return DepthprobeError(
        f"cannot write {path}: {reason}; free some space (or choose another --out) and rerun — "
        "files completed before are unchanged"
    )


def temp_path(path: str | Path) -> Path:
    """Hidden sibling of ``path`` named after this process (a later run can tell it is stale)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def _fsync_path(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot fsync a folder; a full disk can still show here
        if is_disk_full(exc):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path; when the block ends without error, move it over ``path``.

    On any error the temporary file is removed and ``path`` is untouched; a full disk
    becomes a :class:`DepthprobeError`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(path)
    tmp = temp_path(path)
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(path.parent, directory=True)
    except Exception as exc:
        if is_disk_full(exc):
            raise disk_full_error(exc, path) from exc
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _remove_dead_temps(path: Path) -> None:
    """Temporary siblings of ``path`` left by a killed process (its pid no longer runs)."""
    for tmp in path.parent.glob(f".{path.name}{TMP_MARK}*"):
        pid = tmp.name.rsplit(TMP_MARK, 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """``write(tmp_path)``, then move the finished file over ``path`` (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_to_csv(frame, path: str | Path, **kwargs) -> None:
    """``DataFrame.to_csv`` through a temporary file."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, **kwargs)


def atomic_save_pretrained(out_dir: str | Path, *objects, **kwargs) -> Path:
    """``obj.save_pretrained`` of each object (model, tokenizer; ``None`` skipped) into a
    temporary folder inside ``out_dir``, then each finished file moved into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".save{TMP_MARK}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for obj in objects:
            if obj is not None:
                obj.save_pretrained(staging, **({} if _is_tokenizer(obj) else kwargs))
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        mode = _file_mode()
        for f in files:
            os.chmod(f, mode)  # some writers create 0600 files; an export is as readable as any other output
            _fsync_path(f)
        for f in files:
            target = out / f.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, target)
        _fsync_path(out, directory=True)
    except Exception as exc:
        if is_disk_full(exc):
            raise disk_full_error(exc, out) from exc
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _file_mode() -> int:
    """The mode a plain ``open(..., "w")`` gives a new file here (0666 less the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def load_checkpoint(path: str | Path, map_location=None) -> dict:
    """``torch.load(weights_only=True)``: a pickle that would run code is refused, a truncated
    or foreign file is a one-line error."""
    import torch  # here, not at the top: the CLI imports this module and must start fast

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DepthprobeError(
            f"{path} holds more than tensors ({first}); refusing to unpickle it, as that could run code — "
            "load only checkpoints depthprobe wrote"
        ) from exc
    except (EOFError, RuntimeError, ValueError, zipfile.BadZipFile) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DepthprobeError(f"{path} is truncated or not a checkpoint ({first}); delete it and start "
                              "without --resume") from exc


def _is_tokenizer(obj) -> bool:
    return hasattr(obj, "convert_tokens_to_ids")


# --------------------------------------------------------------------------- the --out lock
_held: dict[Path, int] = {}  # lock files this process holds -> nesting depth


@contextlib.contextmanager
def out_lock(out_dir: str | Path, command: str = "depthprobe") -> Iterator[Path]:
    """Own ``out_dir`` for the duration of the block, or refuse in one line if another live
    depthprobe process owns it. Re-entrant within one process."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DepthprobeError(f"--out {out} is a file, not a folder; choose a folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DepthprobeError(f"cannot create --out {out}: {exc.strerror or exc}") from exc
    path = (out / LOCK_NAME).resolve()
    if path in _held:
        _held[path] += 1
        try:
            yield out
        finally:
            _held[path] -= 1
        return
    fd = _acquire(path, command)
    _held[path] = 1
    try:
        yield out
    finally:
        del _held[path]
        with contextlib.suppress(OSError):
            os.unlink(path)  # unlink before unlocking: a waiter that opened the old file retries
        os.close(fd)
        if created:  # a command refused before writing anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                out.rmdir()


def _acquire(path: Path, command: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise DepthprobeError(_busy_message(path.parent, holder)) from None
        except OSError:  # a file system without flock (some NFS): trust the pid it records
            holder = _read_holder(fd)
            if holder and _alive_here(holder):
                os.close(fd)
                raise DepthprobeError(_busy_message(path.parent, holder)) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder unlinked it between our open and our lock
            os.close(fd)
            continue
        break
    previous = _read_holder(fd)
    if previous and previous.get("pid") != os.getpid():
        log.warning("taking over %s from %s (pid %s), which is no longer running", path.parent,
                    previous.get("command"), previous.get("pid"))
        _remove_stale_temps(path.parent, previous)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return fd


def _read_holder(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 4096, 0)
        holder = json.loads(raw.decode() or "null")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _alive_here(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # another machine's process: cannot check, assume it runs
    try:
        return pid_alive(int(holder.get("pid", 0)))
    except (TypeError, ValueError):
        return False


def _busy_message(out: Path, holder: dict | None) -> str:
    who = (f"{holder.get('command', 'depthprobe')} (pid {holder.get('pid')} on {holder.get('host')}, "
           f"since {holder.get('started')})") if holder else "another depthprobe process"
    return f"--out {out} is in use by {who}; wait for it to finish or choose another --out"


def _remove_stale_temps(out: Path, holder: dict) -> None:
    """Temporary files and folders a killed holder left in ``out`` (``*.tmp-<pid>``)."""
    suffix = f"{TMP_MARK}{holder.get('pid')}"
    for p in out.rglob(f"*{suffix}"):
        if p.name.endswith(suffix):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()


def locks_out(option: str = "out_dir"):
    """Decorator for a click command callback: hold :func:`out_lock` on the ``option``
    folder (when given) for the whole command, before anything slow starts."""

    def decorate(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            out = kwargs.get(option)
            if not out or os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 writes, and locks
                return func(*args, **kwargs)
            with out_lock(out, command=f"depthprobe {func.__module__.rsplit('.', 1)[-1]}"):
                return func(*args, **kwargs)

        return wrapper

    return decorate
