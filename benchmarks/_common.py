"""Helpers shared by the benchmark scripts: timing with alternation, and the real model."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternate(fns: dict[str, Callable[[], object]], repeats: int = 3, warmup: bool = True) -> dict[str, float]:
    """Median wall time of each function, run in alternation so load drifts hit all alike."""
    if warmup:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def report(title: str, medians: dict[str, float], baseline: str, goal: str) -> None:
    print(f"== {title}")
    for name, t in medians.items():
        print(f"  {name:<28s} {t:8.3f} s  ({t / medians[baseline]:.3f}x {baseline})")
    print(f"  goal: {goal}")
