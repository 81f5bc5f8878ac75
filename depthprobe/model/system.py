"""What this machine offers: memory available now per device, and ``--max-memory`` parsed.

The probes of the memory plan (:mod:`depthprobe.model.memory`) and of layer-major execution.
"""

from __future__ import annotations

from pathlib import Path

import torch

from depthprobe.errors import DepthprobeError


def available_memory() -> dict[str, int]:
    """Bytes available now: ``cpu`` (MemAvailable, capped by a cgroup limit) and ``cuda:N``."""
    avail: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail["cpu"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    if "cpu" not in avail:
        import psutil

        avail["cpu"] = int(psutil.virtual_memory().available)
    cgroup = _cgroup_room()
    if cgroup is not None:
        avail["cpu"] = min(avail["cpu"], cgroup)
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            avail[f"cuda:{i}"] = int(torch.cuda.mem_get_info(i)[0])
    return avail


def _cgroup_room() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(int(limit) - used, 0)


def parse_max_memory(value: str | dict | None) -> dict | None:
    """``"0:70GiB,cpu:20GiB"`` -> ``{0: "70GiB", "cpu": "20GiB"}`` (accelerate's format)."""
    if value is None or isinstance(value, dict):
        return value
    from accelerate.utils import convert_file_size_to_int

    out: dict = {}
    for part in (p.strip() for p in value.split(",") if p.strip()):
        dev, sep, size = part.rpartition(":")
        dev = dev.strip()
        if not sep or not size.strip():
            raise DepthprobeError(f"--max-memory takes DEVICE:SIZE pairs like 0:70GiB,cpu:20GiB (got {part!r})")
        try:
            convert_file_size_to_int(size.strip())
        except ValueError as exc:
            raise DepthprobeError(f"--max-memory {part!r}: {size!r} is not a size like 20GiB or 500MB") from exc
        key = dev.removeprefix("cuda:")
        if key.isdigit():
            out[int(key)] = size.strip()
        elif key in ("cpu", "disk", "mps"):
            out[key] = size.strip()
        else:
            raise DepthprobeError(f"--max-memory device {dev!r} unknown; use a GPU index (0, 1, ...), cpu or disk")
    if not out:
        raise DepthprobeError("--max-memory is empty; give DEVICE:SIZE pairs like 0:70GiB,cpu:20GiB")
    return out
