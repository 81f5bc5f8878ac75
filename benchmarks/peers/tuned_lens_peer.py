"""tuned-lens 0.2's side of ``bench_lens_peers.py``; runs in its own venv (see that docstring).

Trains with the package's own training loop (``tuned_lens.scripts.train_loop.Train.execute``:
its optimizer, scheduler, clipping, bf16 autocast and checkpoint-free defaults) on token
windows handed over as a tensor, in the order given (its data loader without the shuffle): its CLI
cannot load models on transformers 5 (``load_in_8bit`` reaches ``LlamaForCausalLM.__init__``),
so the model and data ingredients are replaced by ones that return what the benchmark made.
Then scores lens folders (its own and depthprobe's) with its API on held-out windows:
per layer, KL(final || lens) averaged over positions.

    python tuned_lens_peer.py --model-dir DIR --train-ids train.pt --eval-ids eval.pt --steps S \\
        --tokens-per-step K --out LENS_DIR --score DIR1,DIR2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from tuned_lens import TunedLens
from tuned_lens.nn import LogitLens
from tuned_lens.scripts import ingredients as ing
from tuned_lens.scripts.train_loop import Train


def main() -> None:
    ap = argparse.ArgumentParser()
    for name in ("--model-dir", "--train-ids", "--eval-ids", "--out", "--json"):
        ap.add_argument(name, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--tokens-per-step", type=int, required=True)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--score", default="")
    args = ap.parse_args()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    load_s = time.perf_counter() - t0
    train_ids = torch.load(args.train_ids, weights_only=True)
    t1 = time.perf_counter()
    train(model, tokenizer, train_ids, args)
    train_s = time.perf_counter() - t1
    eval_ids = torch.load(args.eval_ids, weights_only=True)
    scores = {folder: score(model, folder, eval_ids) for folder in filter(None, [args.out, *args.score.split(",")])}
    scores["logit"] = score(model, None, eval_ids)
    Path(args.json).write_text(json.dumps({"load_s": load_s, "train_s": train_s, "kl": scores}))


def train(model, tokenizer, train_ids: torch.Tensor, args) -> None:
    @dataclass
    class GivenModel(ing.Model):
        def load(self, device=None, must_use_cache: bool = False):
            return model, tokenizer

    @dataclass
    class GivenData(ing.Data):
        def load(self, tokenizer):
            data = Dataset.from_dict({"input_ids": train_ids.tolist()})
            data.set_format("torch")
            return data, 1.0

    @dataclass
    class InOrder(ing.Distributed):
        def data_loader(self, dataset):  # the package's, without its shuffle: the windows in the order given
            from torchdata import dataloader2, datapipes

            dp = datapipes.iter.IterableWrapper(dataset).sharding_filter().batch(self.per_gpu_batch_size).collate()
            return dataloader2.DataLoader2(dp, reading_service=None)

    loop = Train(model=GivenModel(name=args.model_dir), data=GivenData(), opt=ing.Optimizer(),
                 dist=InOrder(per_gpu_batch_size=args.batch_size),
                 output=Path(args.out), seed=args.seed, num_steps=args.steps, tokens_per_step=args.tokens_per_step)
    loop.execute()


@torch.no_grad()
def score(model, folder: str | None, ids: torch.Tensor) -> list[float]:
    """KL(final || lens) per lens index i >= 1 (depthprobe layer i - 1), mean over positions."""
    lens = LogitLens.from_model(model) if folder is None else TunedLens.from_model_and_pretrained(model, folder)
    sums, count = None, 0
    for row in range(0, len(ids), 2):
        batch = ids[row:row + 2]
        out = model(input_ids=batch, output_hidden_states=True)
        final = out.logits.float().log_softmax(-1)
        kls = []
        for i, h in enumerate(out.hidden_states[:-1]):
            logq = lens(h, idx=i).float().log_softmax(-1)
            kls.append(float((final.exp() * (final - logq)).sum(-1).double().sum()))
        sums = kls if sums is None else [a + b for a, b in zip(sums, kls, strict=False)]
        count += batch.numel()
    return [s / count for s in sums[1:]] + [0.0]  # the last block's output is the model's own


if __name__ == "__main__":
    main()
