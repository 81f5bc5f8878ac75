"""What a block or a causal LM returns, read the same way whatever the architecture."""

from __future__ import annotations

import torch


def block_output(output) -> torch.Tensor:
    """A block's hidden-state output, whether it returns a tensor or a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def lm_logits(output) -> torch.Tensor:
    """The next-token logits ``(B, T, V)`` of a causal-LM output.

    Multi-head outputs (several prediction heads stacked on a leading or trailing axis, or a
    list of them) give the first head: the next-token one.
    """
    logits = output.logits if hasattr(output, "logits") else output[0]
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits
