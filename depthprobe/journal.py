"""Append-only JSON-lines journals of finished steps, so a killed run resumes where it stopped.

Line 1 is ``{"fingerprint": ...}`` (what run the steps belong to); each later line is
``{"key": ..., "data": ...}``, flushed and fsynced as soon as its step is done. A line cut
by a kill is ignored (that step is simply done again), so a resumed run ends with exactly
the values an uninterrupted one computes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from depthprobe.errors import DepthprobeError

log = logging.getLogger(__name__)


class Journal:
    """Finished steps of one run, keyed by a JSON-serialisable key; ``path=None`` records nothing."""

    def __init__(self, path: str | Path | None, fingerprint: str, what: str = "run"):
        self.path = Path(path) if path else None
        self.fingerprint = fingerprint
        self.steps: dict[str, object] = {}
        if self.path is None or not self.path.is_file():
            return
        lines = self.path.read_text(errors="replace").splitlines()
        try:
            header = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict):  # killed while writing the header: nothing was finished
            self.path.unlink()
            return
        if header.get("fingerprint") != fingerprint:
            raise DepthprobeError(f"{self.path} belongs to a different {what} (other model, text or options); "
                                  "delete it or drop --resume")
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # the line a kill cut short: redo that step
                break
            self.steps[json.dumps(rec["key"])] = rec["data"]
        if self.steps:
            log.info("resuming: %d finished step(s) in %s", len(self.steps), self.path)

    def get(self, key):
        return self.steps.get(json.dumps(key))

    def append(self, key, data) -> None:
        self.steps[json.dumps(key)] = data
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.is_file() or self.path.stat().st_size == 0
        with self.path.open("a") as f:
            if new:
                f.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")
            f.write(json.dumps({"key": key, "data": data}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def resume_files(out_dir: str | Path | None, names: Iterable[str], resume: bool) -> dict[str, Path]:
    """Journal paths in ``out_dir`` (none without a folder); without ``resume`` old ones are
    removed, so a fresh run never mixes in another run's steps."""
    if out_dir is None:
        return {}
    paths = {name: Path(out_dir) / name for name in names}
    if not resume:
        for p in paths.values():
            p.unlink(missing_ok=True)
    return paths
