"""TransformerLens 4.3's side of ``bench_lens_peers.py``; runs in its own venv (see that docstring).

The logit lens as TransformerLens users compute it: ``TransformerBridge.boot_transformers``
(raw HF weights), ``run_with_cache`` (only the residual-stream hooks cached), then
``cache.accumulated_resid(apply_ln=True, incl_mid=True)`` (the final norm recomputed on every
state) through ``bridge.unembed``; per state, the mean next-token loss over the windows.
Written as JSON: ``{label: loss}`` with TransformerLens's labels (``{l}_pre``, ``{l}_mid``,
``final_post``) and the seconds of each phase.

    python tl_lens_peer.py --model-dir DIR --ids ids.pt --batch-size 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformer_lens.model_bridge import TransformerBridge


def main() -> None:
    t0 = time.perf_counter()
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    bridge = TransformerBridge.boot_transformers(args.model_dir, device="cpu", dtype=torch.float32)
    t_load = time.perf_counter()
    ids = torch.load(args.ids, weights_only=True)
    sums: dict[str, float] = {}
    count = 0
    with torch.no_grad():
        for start in range(0, len(ids), args.batch_size):
            batch = ids[start:start + args.batch_size]
            _, cache = bridge.run_with_cache(batch, names_filter=lambda name: "resid" in name)
            resid, labels = cache.accumulated_resid(apply_ln=True, incl_mid=True, return_labels=True)
            targets = batch[:, 1:].reshape(-1)
            for state, label in zip(resid, labels, strict=False):
                logits = bridge.unembed(state)[:, :-1].reshape(-1, bridge.cfg.d_vocab)
                sums[label] = sums.get(label, 0.0) + float(F.cross_entropy(logits.float(), targets, reduction="sum"))
            count += targets.numel()
            del cache, resid
    done = time.perf_counter()
    Path(args.json).write_text(json.dumps({"loss": {k: v / count for k, v in sums.items()},
                                           "load_s": t_load - t0, "lens_s": done - t_load}))


if __name__ == "__main__":
    main()
