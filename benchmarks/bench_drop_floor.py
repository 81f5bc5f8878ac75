"""The drop sweep against its floor: the block calls it must make x one block's time.

Issue 24's engine goal: the single-block + sublayer sweep (96 variants on Llama-2-7B's 32
blocks, no contiguous runs) costs <= 1.2x its floor. Measured in one process on the same
model, dtype and tokens:

- one block's time: the median over blocks of each block's wall time inside a plain
  ``torch.no_grad`` forward (forward pre/post hooks; the first forward is a warm-up that
  reads the memory-mapped weights in, then the median of ``--repeats`` forwards);
- the block calls the sweep must make: one prefix pass (every block once), then for each
  dropped block l the blocks after it, and for each dropped sublayer of block l block l
  itself (its other sublayer; counted as a whole block call) and the blocks after it.
  Counted from the sweep's plan and, as a check, by a hook on every block during the sweep;
- the sweep: ``run_drop_sweep(stack, windows, sublayers=True, block_sizes=())``, one batch.

Printed beside the blocks-only floor: the floor with the head (final norm + LM head, timed
in the same plain forwards) once per scored variant and for the prefix pass, since every
variant must also be scored.

    .venv/bin/python benchmarks/bench_drop_floor.py            # the Llama-2-7B-shaped bf16 model
    .venv/bin/python benchmarks/bench_drop_floor.py --model smollm2 --dtype float32 --seq-len 64
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import depthprobe  # noqa: E402
from depthprobe.config import ProbeConfig  # noqa: E402
from depthprobe.hooking import hooked, hooked_all  # noqa: E402
from depthprobe.probes.drop import run_drop_sweep  # noqa: E402
from depthprobe.probes.drop_tables import DropPlan  # noqa: E402

GOAL = 1.2


def block_times(model, stack, ids: torch.Tensor) -> tuple[list[float], float, float]:
    """(each block's seconds, the head's seconds, the whole forward's seconds) in one plain forward."""
    started: dict[int, float] = {}
    spent: dict[int, float] = {}
    head_modules = [m for m in (stack.final_norm, stack.head) if m is not None]

    def pre(key):
        def hook(module, args):
            started[key] = time.perf_counter()
        return hook

    def post(key):
        def hook(module, args, output):
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - started[key]
        return hook

    modules = list(stack.blocks) + head_modules
    with contextlib.ExitStack() as hooks:
        for i, m in enumerate(modules):
            hooks.enter_context(hooked(m, pre=pre(i), post=post(i), with_kwargs=False))
        t0 = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    whole = time.perf_counter() - t0
    L = len(stack.blocks)
    return [spent[i] for i in range(L)], sum(spent.get(L + j, 0.0) for j in range(len(head_modules))), whole


def calls_the_sweep_must_make(plan: DropPlan, num_layers: int) -> int:
    """Block calls of a prefix-cached sweep: the prefix pass, then each variant's stream from
    its first changed block (``Variant.start``) to the last block."""
    return num_layers + sum(num_layers - v.start for v in plan.variants)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path("~/.cache/depthprobe-bench/llama2-7b-shape").expanduser()))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="timed plain forwards (after one warm-up)")
    args = ap.parse_args()

    workload = ProbeConfig(metrics=("drop",), num_sequences=1, batch_size=1, seq_len=args.seq_len)  # the memory plan's
    model, tok = depthprobe.load_model(args.model, dtype=args.dtype, device="cpu", workload=workload)
    model.eval()
    stack = depthprobe.LayerStack.from_model(model)
    windows = depthprobe.make_windows(tok, num_sequences=1, seq_len=args.seq_len)
    ids = windows.input_ids

    block_times(model, stack, ids)  # warm-up: reads the mapped weights in
    runs = [block_times(model, stack, ids) for _ in range(args.repeats)]
    per_block = statistics.median(t for blocks, _, _ in runs for t in blocks)
    head = statistics.median(h for _, h, _ in runs)
    forward = statistics.median(w for _, _, w in runs)

    counted = [0]
    counters = [(block, lambda module, inputs, output: counted.__setitem__(0, counted[0] + 1)) for block in stack.blocks]
    t0 = time.perf_counter()
    with hooked_all(counters):
        sweep = run_drop_sweep(stack, windows, batch_size=1, sublayers=True, block_sizes=(), progress=True)
    seconds = time.perf_counter() - t0

    after = block_times(model, stack, ids)  # the same measure after the sweep: drift on a shared machine
    plan = DropPlan.of(stack, True, ())
    calls, variants = calls_the_sweep_must_make(plan, len(stack)), len(plan.variants)
    floor = calls * per_block
    floor_with_head = floor + (variants + 1) * head
    print(f"== drop sweep vs its floor ({args.model}, {args.dtype}, 1x{args.seq_len} tokens, "
          f"torch threads {torch.get_num_threads()})")
    print(f"  plain forward {forward:.2f} s: one block {per_block:.3f} s (median of {len(stack)} x {args.repeats}), "
          f"head {head:.3f} s; after the sweep: one block {statistics.median(after[0]):.3f} s")
    print(f"  variants {variants} ({sweep.block.shape[0]} blocks + sublayers); block calls the sweep must make {calls}, made {counted[0]}")
    print(f"  sweep {seconds:.1f} s; floor {floor:.1f} s (blocks only), {floor_with_head:.1f} s with the head per variant")
    print(f"RATIO sweep/floor = {seconds / floor:.3f} (goal <= {GOAL}); sweep/(floor + heads) = "
          f"{seconds / floor_with_head:.3f}")


if __name__ == "__main__":
    main()
