"""Straightforward reference computations the tests compare depthprobe against.

Deliberately naive: keep every activation, use plain torch functions, one loop per metric.
Nothing here imports depthprobe.probes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def block_states(model, blocks, input_ids):
    """Run the model once and return ``[x_0, x_1, ..., x_L]`` (x_l = input of block l,
    x_{l+1} its raw output) captured by plain forward hooks, plus the model output."""
    states: dict[int, torch.Tensor] = {}

    def make(i):
        def hook(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            if i == 0:
                states[0] = x_in.detach().clone()
            out = output[0] if isinstance(output, tuple) else output
            states[i + 1] = out.detach().clone()

        return hook

    handles = [b.register_forward_hook(make(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids)
    finally:
        for h in handles:
            h.remove()
    return [states[i] for i in range(len(blocks) + 1)], out


def angle(a, b):
    """mean over tokens of arccos(cos)/pi, in float64."""
    cos = F.cosine_similarity(a.double().flatten(0, -2), b.double().flatten(0, -2), dim=-1).clamp(-1, 1)
    return float(torch.arccos(cos).mean() / math.pi)


def block_influence(a, b):
    return float(1 - F.cosine_similarity(a.double().flatten(0, -2), b.double().flatten(0, -2), dim=-1).mean())


def variance(x):
    return float(x.double().flatten(0, -2).var(dim=-1, unbiased=False).mean())


def rms(x):
    return float(x.double().flatten(0, -2).pow(2).mean(-1).sqrt().mean())


def lm_loss(logits, input_ids):
    return float(F.cross_entropy(logits[:, :-1].double().flatten(0, 1), input_ids[:, 1:].flatten()))


def block_grad_norms(model, blocks, input_ids):
    """Per-block L2 gradient norms of the mean-token LM loss over the whole batch."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    norms = []
    for b in blocks:
        grads = [p.grad.double().flatten() for p in b.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.cat(grads))))
    model.zero_grad(set_to_none=True)
    return norms
