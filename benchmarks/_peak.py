"""Run a command and sample its peak memory from ``/proc/PID/status`` (Linux).

``RssAnon`` is anonymous memory (what the kernel's OOM killer weighs; memory-mapped
safetensors weights are not in it); ``VmHWM`` is the kernel's own peak of the resident set
(anonymous + file-backed pages), for comparison with the memory plan's resident peak.
"""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Measured:
    returncode: int
    seconds: float
    peak_anon: int  # bytes, sampled every ``interval`` seconds
    peak_resident: int  # bytes, VmHWM at the last sample
    output: str


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def run_sampled(cmd: list[str], interval: float = 0.05, env: dict | None = None) -> Measured:
    """Run ``cmd`` to completion; its output is captured and returned."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peaks = {"RssAnon": 0, "VmHWM": 0}
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        for key, value in _status(proc.pid).items():
            if key in peaks:
                peaks[key] = max(peaks[key], value)
        time.sleep(interval)
    reader.join()
    return Measured(proc.returncode, time.perf_counter() - t0, peaks["RssAnon"], peaks["VmHWM"], "".join(chunks))


def gib(nbytes: int) -> str:
    return f"{nbytes / 1024**3:.2f} GiB"
