"""The streams of layer-major execution: ``count`` residual streams of all windows,
``(count, N, T, d)``, in RAM or in a memory-mapped temporary file; and their checkpoints,
so a killed layer-major sweep resumes after the last block it finished."""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path

import torch

from depthprobe.model.memory import available_memory, state_budget
from depthprobe.probes.batch import Batch
from depthprobe.safeio import TMP_MARK, atomic_write

log = logging.getLogger(__name__)


def default_state_budget() -> int:
    """Bytes of cached streams kept in RAM before spilling to disk: a quarter of the memory
    available now (``DEPTHPROBE_STATE_BUDGET`` overrides, in bytes)."""
    env = os.environ.get("DEPTHPROBE_STATE_BUDGET")
    if env:
        return int(float(env))
    return state_budget(available_memory()) or 1024**3  # 1 GiB when the available memory is unknown


class StateStore:
    """``count`` residual streams of all windows, ``(count, N, T, d)``, on the CPU.

    In RAM when they fit ``budget`` bytes, otherwise in a memory-mapped temporary file under
    ``folder`` (default: the system temp folder), removed by :meth:`close`: the page cache
    holds what is in use and the kernel writes the rest back, so anonymous memory stays flat.
    """

    def __init__(self, count: int, shape: tuple[int, ...], dtype: torch.dtype, budget: int,
                 folder: str | os.PathLike | None = None):
        numel = count * math.prod(shape)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.path: Path | None = None
        if nbytes <= budget:
            self.data = torch.empty((count, *shape), dtype=dtype)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="depthprobe-states-", dir=folder)
            self.path = Path(self._tmp.name) / "states.bin"
            with open(self.path, "wb") as f:
                f.truncate(nbytes)
            self.data = torch.from_file(str(self.path), shared=True, size=numel, dtype=dtype).view(count, *shape)
            log.info("layer-major states: %.2f GB spilled to %s (budget %.2f GB)", nbytes / 1e9, self.path, budget / 1e9)
        self.nbytes = nbytes

    @property
    def spilled(self) -> bool:
        return self.path is not None

    def close(self) -> None:
        self.data = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_store(embed, batches: list[Batch], count: int, budget: int | None,
               folder: str | os.PathLike | None, fill: bool = True) -> StateStore:
    """A store of ``count`` streams with x_0 (``embed(batch)``: the prelude's output) of
    every window in slot 0 (computed for every batch; with ``fill=False`` only to learn the
    shape, for a resumed sweep that loads its streams)."""
    n_windows = batches[-1].rows.stop
    store = None
    for batch in batches:
        x0 = embed(batch)
        if store is None:
            budget = default_state_budget() if budget is None else budget
            store = StateStore(count, (n_windows, *x0.shape[1:]), x0.dtype, budget, folder)
            if not fill:
                break
        store.data[0, batch.rows] = x0.cpu()
    return store


class StreamCheckpoints:
    """Resume for a layer-major sweep: after block ``l`` has run on every window, the live
    streams go to ``<journal>.layer{l}.bin`` (written whole, then renamed) and a journal line
    ``["layer", l]`` records which slots it holds and what else the sweep has summed so far.

    A resumed sweep loads the newest block whose line and file are both there and continues
    with block ``l+1`` from exactly the stored bytes, so it ends with the numbers of an
    uninterrupted run. The file of block ``l-2`` is removed once ``l`` is recorded (a kill
    between the file and its line falls back to ``l-1``); all are removed when the sweep ends.
    ``journal.path=None`` keeps nothing.
    """

    def __init__(self, journal):
        self.journal = journal
        self.path = Path(journal.path) if journal.path is not None else None

    def _file(self, layer: int) -> Path:
        return self.path.with_name(f"{self.path.stem}.layer{layer}.bin")

    def _files(self) -> list[Path]:
        return list(self.path.parent.glob(f"{self.path.stem}.layer*.bin")) + \
            list(self.path.parent.glob(f".{self.path.stem}.layer*.bin{TMP_MARK}*"))

    def latest(self, num_layers: int, slot_bytes: int) -> tuple[int, dict] | None:
        """``(l, journal entry)`` of the newest block that can be resumed from, or None (stale
        files of another attempt are then removed)."""
        if self.path is None:
            return None
        for layer in reversed(range(num_layers)):
            entry = self.journal.get(["layer", layer])
            file = self._file(layer)
            if entry is not None and file.is_file() and file.stat().st_size == slot_bytes * len(entry["slots"]):
                return layer, entry
        self.clear()
        return None

    def restore(self, data: torch.Tensor, layer: int, slots: list[int]) -> None:
        """Load the streams saved after block ``layer`` into their slots of ``data``."""
        with open(self._file(layer), "rb") as f:
            for slot in slots:
                target = data[slot].view(torch.uint8).view(-1)
                target.copy_(torch.frombuffer(bytearray(f.read(target.numel())), dtype=torch.uint8))
        log.info("layer-major sweep: resuming after block %d from %s", layer, self._file(layer))

    def save(self, layer: int, data: torch.Tensor, slots: list[int], extra: dict) -> None:
        """Record that block ``layer`` is done: streams ``slots`` of ``data``, then the journal line."""
        if self.path is None:
            return

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                for slot in slots:
                    f.write(data[slot].contiguous().view(torch.uint8).numpy().tobytes())

        atomic_write(self._file(layer), write)
        self.journal.append(["layer", layer], {"slots": slots, **extra})
        self._file(layer - 2).unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove every stream file of this journal (the sweep finished or starts over)."""
        if self.path is None:
            return
        for file in self._files():
            file.unlink(missing_ok=True)
