"""Lens readouts over the calibration windows: the ``tuned-lens`` sweep (``logit_lens_kl``,
``tuned_lens_loss``, ``tuned_lens_kl`` per block) and the per-position table
``lens_tokens.csv`` (``--lens-positions``): the logit lens's top-k tokens per block at chosen
positions, with their probabilities.

Both run the model's own forward once per batch, keep that batch's block outputs
x_1..x_L and read them through the final norm and head (:meth:`LayerStack.logits`).
"""

from __future__ import annotations

import logging

import pandas as pd
import torch
from tqdm.auto import tqdm

from depthprobe import distributed
from depthprobe.errors import DepthprobeError
from depthprobe.probes import metrics as M
from depthprobe.probes.batch import batches_of
from depthprobe.probes.hooks import evaluating, watch_blocks
from depthprobe.probes.sweep import SweepContext, SweepOutput
from depthprobe.probes.tuned_lens import ReadoutSums, TunedLens, check_heldout, kl_sum, load_lens

log = logging.getLogger(__name__)

#: the columns of ``lens_tokens.csv``
TOKEN_COLUMNS = ("window", "position", "layer", "rank", "token_id", "token", "prob")


def _walk(ctx: SweepContext, desc: str):
    """``(batch, outputs, final logits)`` per batch: x_1..x_L (block outputs) and the model's logits."""
    objective, stack = ctx.objective, ctx.stack
    batches = batches_of(ctx.windows, ctx.batch_size)
    bar = tqdm(total=len(batches), desc=desc, disable=not ctx.progress, leave=False, delay=0.5)
    with evaluating(stack.model), torch.no_grad():
        for batch in batches:
            batch = objective.place(batch)
            outs: dict[int, torch.Tensor] = {}
            with watch_blocks(stack, lambda layer, x_in, x_out, outs=outs: outs.__setitem__(layer, x_out.detach())):
                logits = objective.logits(objective.forward(batch, head=True))
            yield batch, [outs[i] for i in range(len(stack))], logits
            bar.update()
    bar.close()


def readout_sums(ctx: SweepContext, lens: TunedLens) -> ReadoutSums:
    """Per-layer sums of KL to the final distribution and next-token NLL, logit and tuned lens."""
    stack = ctx.stack
    sums = ReadoutSums.zeros(len(stack))
    for batch, outs, logits in _walk(ctx, "tuned lens"):
        final = torch.log_softmax(logits.float(), dim=-1)
        ids = batch.targets
        sums.positions += ids.numel()
        sums.predictions += ctx.objective.predictions(batch)
        for layer, hidden in enumerate(outs):
            plain = stack.logits(hidden, ids)
            sums.logit_kl[layer] += kl_sum(final, plain)
            sums.logit_nll[layer] += float(M.next_token_nll_sum(plain, ids)[0])
            index = lens.for_layer(layer)
            tuned = plain if index is None else stack.logits(lens.transform(hidden, index), ids)
            sums.tuned_kl[layer] += kl_sum(final, tuned)
            sums.tuned_nll[layer] += float(M.next_token_nll_sum(tuned, ids)[0])
    return sums.reduced()


def tuned_lens_sweep(ctx: SweepContext) -> SweepOutput:
    """``--metrics tuned-lens``: the lens from ``--lens DIR``, or one trained now on the built-in
    training text with a small budget (said in the summary)."""
    if not ctx.objective.lm:
        why = "no tuned lens: this model has no LM head (an encoder)"
        return SweepOutput(not_applicable={c: why for c in ("logit_lens_kl", "tuned_lens_loss", "tuned_lens_kl")})
    folder = ctx.options.lens.lens_dir
    if folder is not None:
        lens, training = load_lens(folder, ctx.stack)
    else:
        from depthprobe.probes.lens_train import quick_lens

        if ctx.tokenizer is None:
            raise DepthprobeError("--metrics tuned-lens without --lens trains a lens first, which needs the "
                                  "tokenizer; pass --lens DIR (from `depthprobe lens train`)")
        lens, training = quick_lens(ctx.stack, ctx.tokenizer, progress=ctx.progress)
    check_heldout(training, ctx.windows.input_ids, ctx.windows.source)
    sums = readout_sums(ctx, lens)
    text = training.get("text", {})
    summary = {"tuned_lens": {"lens_dir": None if folder is None else str(folder),
                              "trained_on": text.get("description", "unknown (a lens saved by tuned-lens)"),
                              "steps": training.get("steps"), "tokens_per_step": training.get("tokens_per_step"),
                              "seed": training.get("seed")}}
    # logit_lens_loss too: the same numbers as the main pass's when lens is also asked
    return SweepOutput(columns=sums.columns(with_logit_loss=True), summary=summary)


def resolve_positions(positions: tuple[int, ...], seq_len: int) -> list[int]:
    """``--lens-positions`` (negative: from the end) as 0-based positions of a window."""
    resolved = []
    for p in positions:
        q = p + seq_len if p < 0 else p
        if not 0 <= q < seq_len:
            raise DepthprobeError(f"--lens-positions {p} is outside a window of {seq_len} tokens; "
                                  f"use -{seq_len}..{seq_len - 1}")
        resolved.append(q)
    return list(dict.fromkeys(resolved))


def lens_tokens_sweep(ctx: SweepContext) -> SweepOutput:
    """``lens_tokens.csv``: for each window, chosen position and block, the logit lens's top-k
    tokens (rank 1 = most likely) with their probabilities."""
    opts = ctx.options.lens
    if not ctx.objective.lm:
        return SweepOutput(summary={"lens_tokens": "not applicable: this model has no LM head"})
    positions = resolve_positions(opts.positions, ctx.windows.seq_len)
    topk = min(opts.topk, ctx.stack.head.out_features if hasattr(ctx.stack.head, "out_features") else opts.topk)
    rows = []
    decode = _decoder(ctx.tokenizer)
    split = distributed.active()  # torchrun: this process's windows start at split.start
    offset = split.start if split is not None else 0
    for batch, outs, _ in _walk(ctx, "lens tokens"):
        for layer, hidden in enumerate(outs):
            if ctx.stack.positionwise_head:  # the head on the chosen positions only
                logits = ctx.stack.logits(hidden[:, positions])
            else:
                logits = ctx.stack.logits(hidden, batch.targets)[:, positions]
            probs = torch.softmax(logits.float(), dim=-1)
            top = probs.topk(topk, dim=-1)
            values, ids = top.values.cpu().numpy(), top.indices.cpu().numpy()
            for w in range(values.shape[0]):
                for j, pos in enumerate(positions):
                    for r in range(topk):
                        tid = int(ids[w, j, r])
                        rows.append((offset + batch.index + w, pos, layer, r + 1, tid, decode(tid),
                                     float(values[w, j, r])))
    table = pd.DataFrame(distributed.gather_rows(rows) if split is not None else rows, columns=list(TOKEN_COLUMNS))
    return SweepOutput(tables={"lens_tokens": table.sort_values(["window", "position", "layer", "rank"],
                                                                ignore_index=True)})


def _decoder(tokenizer):
    cache: dict[int, str] = {}

    def decode(token_id: int) -> str:
        if token_id not in cache:
            cache[token_id] = tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)
        return cache[token_id]

    return decode
