"""Judging a (pruned) model the way pruning papers do.

    heldout.py  per-window loss on held-out text, bootstrap intervals, held-out prune curve
    cloze.py    the built-in offline multiple-choice cloze task (lm-eval task files)
    harness.py  lm-evaluation-harness on already-loaded models: eval table, retention
    bench.py    prefill / decode tokens per second and peak memory
"""
