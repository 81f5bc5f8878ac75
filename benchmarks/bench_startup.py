"""How fast depthprobe starts, each figure in fresh processes against a plain baseline.

Goals (issue 25):
- ``depthprobe --help`` and every ``COMMAND --help`` <= 1.5 s idle (baseline: a Python
  process that only imports click);
- the second ``load_model("smollm2")`` in a fresh process (cache warm) <= 3 s idle
  (baseline: a plain ``AutoModelForCausalLM.from_pretrained`` of the same cached folder);
- the whole process ``depthprobe analyze smollm2 --metrics lens --num-sequences 4 --seq-len 256``
  <= 1.0x a plain-transformers script that computes the same numbers (the logit-lens loss of
  every block on the same windows), both timed end to end in the same run.

    .venv/bin/python benchmarks/bench_startup.py [--repeats 3] [--skip-analyze]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
COMMANDS = ("analyze", "prune", "train", "compare", "convert", "report", "check", "eval", "bench")

# each prints the seconds of the load call itself, after the imports every script pays
PLAIN_LOAD = """
import time
from transformers import AutoModelForCausalLM, AutoTokenizer
folder = {folder!r}
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
tok = AutoTokenizer.from_pretrained(folder)
print("LOAD_S", time.perf_counter() - t0)
"""

DEPTHPROBE_LOAD = """
import time
import depthprobe
from transformers import AutoModelForCausalLM
t0 = time.perf_counter()
model, tok = depthprobe.load_model("smollm2", device="cpu")
print("LOAD_S", time.perf_counter() - t0)
"""

# the same numbers analyze --metrics lens gives: per block, the next-token loss of the
# stream read through the final norm and head, after the block and between its sublayers
# (the MLP norm's input), on the built-in text's first windows
PLAIN_LENS = """
import torch
from pydoc_data.topics import topics
from transformers import AutoModelForCausalLM, AutoTokenizer
folder = {folder!r}
model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
tok = AutoTokenizer.from_pretrained(folder)
text = "\\n\\n".join(topics[k] for k in sorted(topics))
ids = tok(text[:200_000], add_special_tokens=False)["input_ids"][: {n} * {t}]
ids = torch.tensor(ids).view({n}, {t})
L = model.config.num_hidden_layers
losses, mid_losses, mids = torch.zeros(L), torch.zeros(L), {{}}
def lens(h, batch):
    logits = model.lm_head(model.model.norm(h))[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                             reduction="sum")
for i, layer in enumerate(model.model.layers):
    layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a, i=i: mids.__setitem__(i, a[0]))
with torch.no_grad():
    for batch in ids.split(4):
        hidden = model(input_ids=batch, output_hidden_states=True, use_cache=False).hidden_states
        for layer, h in enumerate(hidden[1:]):
            losses[layer] += lens(h, batch) if layer < L - 1 else torch.nn.functional.cross_entropy(
                model.lm_head(h)[:, :-1].float().reshape(-1, model.config.vocab_size), batch[:, 1:].reshape(-1),
                reduction="sum")
            mid_losses[layer] += lens(mids[layer], batch)
count = ids.shape[0] * (ids.shape[1] - 1)
print((losses / count).tolist(), (mid_losses / count).tolist())
"""


def timed(argv: list[str], repeats: int, inner: list[float] | None = None) -> float:
    """Median wall seconds of a fresh process running ``argv``; the ``LOAD_S`` seconds it
    prints, if any, are appended to ``inner``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        done = subprocess.run(argv, env=ENV, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        times.append(time.perf_counter() - t0)
        if inner is not None:
            inner += [float(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("LOAD_S")]
    return statistics.median(times)


def cached_folder() -> str:
    """The de-quantized SmolLM2 folder (made by a first load if needed)."""
    code = "from depthprobe.model.load import resolve_source; print(resolve_source('smollm2')[0])"
    subprocess.run([sys.executable, "-c", DEPTHPROBE_LOAD], env=ENV, check=True, capture_output=True)
    return subprocess.run([sys.executable, "-c", code], env=ENV, check=True, capture_output=True,
                          text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-analyze", action="store_true")
    args = ap.parse_args()
    py, cli = sys.executable, [sys.executable, "-m", "depthprobe"]

    base = timed([py, "-c", "import click"], args.repeats)
    print(f"== --help (goal <= 1.5 s idle); baseline `python -c 'import click'` {base:.2f} s")
    for command in ("", *COMMANDS):
        t = timed([*cli, *([command] if command else []), "--help"], args.repeats)
        print(f"  depthprobe {command + ' ' if command else ''}--help {t:6.2f} s  ({t / base:.2f}x baseline)")

    folder = cached_folder()
    plain_call, ours_call = [], []
    plain = timed([py, "-c", textwrap.dedent(PLAIN_LOAD.format(folder=folder))], args.repeats, plain_call)
    ours = timed([py, "-c", DEPTHPROBE_LOAD], args.repeats, ours_call)
    pc, oc = statistics.median(plain_call), statistics.median(ours_call)
    print(f"== second load_model('smollm2'), fresh process (goal <= 3 s idle)\n"
          f"  whole process: depthprobe.load_model {ours:6.2f} s   plain from_pretrained {plain:6.2f} s  "
          f"({ours / plain:.2f}x)\n"
          f"  the call after imports: load_model {oc:6.2f} s   from_pretrained + tokenizer {pc:6.2f} s  ({oc / pc:.2f}x)")

    if not args.skip_analyze:
        n, t = 4, 256
        plain = timed([py, "-c", PLAIN_LENS.format(folder=folder, n=n, t=t)], args.repeats)
        ours = timed([*cli, "analyze", "smollm2", "--metrics", "lens", "--num-sequences", str(n), "--seq-len", str(t),
                      "--device", "cpu", "-q"], args.repeats)
        print(f"== whole process, analyze --metrics lens {n}x{t} (goal <= 1.0x)\n"
              f"  depthprobe analyze {ours:6.2f} s   plain transformers script {plain:6.2f} s  ({ours / plain:.2f}x)")


if __name__ == "__main__":
    main()
