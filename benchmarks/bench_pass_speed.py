"""The main pass against plain PyTorch on the same model, dtype, tokens and trainable blocks.

- ``grad`` pass (``run_main_pass(metrics=grad)``: forward, loss, backward, per-block and
  sublayer gradient norms reduced as the backward produces each gradient) against a plain
  forward+backward (``model(ids, labels=ids).loss.backward()``, only block parameters
  trainable, gradients dropped after); goal <= 1.3x.
- forward-only pass (``angular,variance``) against a plain ``torch.no_grad`` forward; goal
  <= 1.3x.
- with ``--old``, the scheme before issue 14 rebuilt here: the plain forward+backward
  holding every gradient, then each block's norm from float64 copies of its gradients,
  twice per parameter (block, then attention / MLP).

Each timed function is run in alternation after one warm-up, with every weight page touched
untimed before each call (the plain baseline's held gradients evict mapped weights on a small
machine, which the next call would otherwise pay for); printed with each: the peak
of anonymous memory above the level before the call (RssAnon sampled every 10 ms: the
gradient pass should sit about one set of block gradients below the plain backward, which
holds them all) and the major page faults (``ru_majflt``: memory-mapped weights read back
from disk).

    .venv/bin/python benchmarks/bench_pass_speed.py [--model smollm2] [--dtype float32]
        [--num-sequences 4] [--seq-len 256] [--batch-size 4] [--repeats 3] [--old]
"""

from __future__ import annotations

import argparse
import gc
import math
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import depthprobe  # noqa: E402
from depthprobe.config import ProbeConfig as Workload  # noqa: E402
from depthprobe.probes import metrics as M  # noqa: E402
from depthprobe.probes.hooks import only_blocks_require_grad  # noqa: E402
from depthprobe.probes.main_pass import run_main_pass  # noqa: E402


class AnonPeak:
    """Peak of this process's RssAnon above its level at the start, sampled in a thread."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak, self.start, self._stop = interval, 0, 0, threading.Event()

    def __enter__(self):
        self.start = self.peak = rss_anon()
        self._stop.clear()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, rss_anon())

    @property
    def extra(self) -> int:
        return self.peak - self.start


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def touch_weights(model) -> None:
    """Read one value per 4 KiB page of every weight: memory-mapped pages that the previous
    call evicted (the plain baseline holds every gradient) come back untimed, so no call
    pays for the one before it."""
    with torch.no_grad():
        for p in model.parameters():
            flat = p.detach().reshape(-1)
            float(flat[:: max(1, 4096 // p.element_size())].float().sum())


def timed_alternation(fns: dict, repeats: int, before=None) -> dict[str, tuple[float, int, int]]:
    """Median seconds, median major page faults and the largest peak of anonymous memory
    above the level before the call, of each function run in alternation (``before`` runs
    untimed ahead of each call)."""
    for fn in fns.values():
        fn()
    seconds: dict[str, list] = {name: [] for name in fns}
    faults: dict[str, list] = {name: [] for name in fns}
    peaks: dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            if before is not None:
                before()
            with AnonPeak() as peak:
                f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_majflt, time.perf_counter()
                fn()
                seconds[name].append(time.perf_counter() - t0)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_majflt - f0)
            peaks[name].append(peak.extra)
    return {name: (statistics.median(seconds[name]), int(statistics.median(faults[name])), max(peaks[name]))
            for name in fns}


def old_norms(stack) -> list[float]:
    """Before issue 14: float64 copies of every held gradient, block then sublayers."""
    out = []
    for layer in range(len(stack)):
        out.append(M.grad_l2(stack.blocks[layer].parameters()))
        for kind in ("attn", "mlp"):
            out.append(M.grad_l2([p for m in stack.sublayer_modules(layer, kind) for p in m.parameters()]))
    return out


def make_functions(model, windows, batch_size: int, old: bool) -> dict:
    stack = depthprobe.LayerStack.from_model(model)
    total = windows.num_sequences * (windows.seq_len - 1)

    def plain_forward_backward(then=None):
        with only_blocks_require_grad(stack):
            for batch in windows.batches(batch_size):
                out = model(input_ids=batch, labels=batch, use_cache=False)
                (out.loss * batch.shape[0] * (batch.shape[1] - 1) / total).backward()
                del out
            if then is not None:
                then(stack)

    def plain_forward():
        with torch.no_grad():
            for batch in windows.batches(batch_size):
                model(input_ids=batch, use_cache=False)

    fns = {
        "plain forward+backward": plain_forward_backward,
        "grad pass": lambda: run_main_pass(stack, windows, ("grad",), batch_size=batch_size, loss=True,
                                           progress=False),
        "plain forward": plain_forward,
        "forward-only pass (angular,variance)": lambda: run_main_pass(
            stack, windows, ("angular", "variance"), batch_size=batch_size, loss=False, progress=False),
    }
    if old:
        fns["old grad (held gradients, float64 copies)"] = lambda: plain_forward_backward(then=old_norms)
    return fns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--num-sequences", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--old", action="store_true", help="also time the pre-issue-14 gradient norms")
    args = ap.parse_args()

    # the plan of the analysis measured here (the plain baseline holds every gradient beyond it)
    workload = Workload(metrics=("grad",), batch_size=args.batch_size, seq_len=args.seq_len,
                        num_sequences=args.num_sequences)
    model, tok = depthprobe.load_model(args.model, dtype=args.dtype, device="cpu", workload=workload)
    model.eval()
    windows = depthprobe.make_windows(tok, num_sequences=args.num_sequences, seq_len=args.seq_len)
    fns = make_functions(model, windows, args.batch_size, args.old)
    results = timed_alternation(fns, args.repeats, before=lambda: touch_weights(model))
    batches = math.ceil(args.num_sequences / args.batch_size)
    print(f"== main pass vs plain PyTorch ({args.model}, {args.dtype}, {args.num_sequences}x{args.seq_len} tokens "
          f"in {batches} batch(es), torch threads {torch.get_num_threads()}, median of {args.repeats})")
    for name, (seconds, faults, extra) in results.items():
        base = "plain forward" if "forward-only" in name or name == "plain forward" else "plain forward+backward"
        print(f"  {name:<44s} {seconds:8.2f} s  {seconds / results[base][0]:.3f}x {base}  "
              f"peak anonymous +{extra / 2**30:.2f} GiB  (major page faults {faults})")
    stack = depthprobe.LayerStack.from_model(model)
    grads = sum(p.numel() * p.element_size() for p in stack.blocks.parameters())
    drop = results["plain forward+backward"][2] - results["grad pass"][2]
    print(f"  block gradients {grads / 2**30:.2f} GiB; the grad pass's peak is {drop / 2**30:.2f} GiB below plain's "
          f"({drop / grads:.2f}x the gradients)")
    grad = results["grad pass"][0] / results["plain forward+backward"][0]
    fwd = results["forward-only pass (angular,variance)"][0] / results["plain forward"][0]
    print(f"RATIO grad/plain = {grad:.3f} (goal <= 1.3); forward-only/plain = {fwd:.3f} (goal <= 1.3)")


if __name__ == "__main__":
    main()
