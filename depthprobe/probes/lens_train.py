"""Train a tuned lens the way tuned-lens 0.2 does (``tuned_lens/scripts/train_loop.py``).

Recipe (its defaults): one zero-initialised affine translator per block input
(:class:`~depthprobe.probes.tuned_lens.TunedLens`); loss, per translator i, the mean over
positions of KL(p_final || q_i) (the same position: token shift 0), each translator's loss
back-propagated on its own and summed; SGD with Nesterov momentum 0.9, lr = lr_scale
x (1 - momentum) = 0.1, weight decay 1e-3, no warmup, the lr decayed linearly to 0 over the
steps; gradients clipped to total norm 1 before every step; 250 steps of 2^18 tokens
(windows of 2048 tokens, gradient accumulation over micro-batches); the lens, the head and
the KL under bfloat16 autocast (``precision="bf16"``, float32 parameters and final
distribution), or all float32 (``"fp32"``). The text is depthprobe's.

Text: ``--text-file`` / ``--dataset`` (all of it), or by default the built-in text **after
its first** :data:`LENS_RESERVED_TOKENS` tokens, which calibration windows (the first tokens
of the built-in text) use: a lens is never scored on its training text
(:func:`~depthprobe.probes.tuned_lens.check_heldout`). A text shorter than the budget is
visited again (epochs, each in a new seeded order); the window order is a function of
``(seed, step)`` only, so ``--resume`` continues exactly. Under torchrun each process takes
its share of each step's windows and the gradients are summed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from depthprobe import distributed, safeio
from depthprobe.data import BUILTIN, _tokenize_stream, builtin_text, dataset_texts, read_text_file
from depthprobe.errors import DepthprobeError
from depthprobe.model.stack import LayerStack
from depthprobe.probes.batch import token_batches
from depthprobe.probes.hooks import watch_blocks
from depthprobe.probes.objective import objective_for
from depthprobe.probes.tuned_lens import TRAIN_CSV, TunedLens, new_lens, save_lens, window_hashes

log = logging.getLogger(__name__)

#: the built-in text's first tokens are the calibration windows' and never train a lens
LENS_RESERVED_TOKENS = 32768
DEFAULT_STEPS = 250
DEFAULT_TOKENS_PER_STEP = 2**18
DEFAULT_SEQ_LEN = 2048
CHECKPOINT = "checkpoint.pt"
#: the budget of a lens trained on the fly by ``analyze --metrics tuned-lens`` without ``--lens``
QUICK_BUDGET = {"steps": 10, "num_sequences": 2, "seq_len": 128}
MAX_HASHES = 20000


@dataclass(frozen=True)
class LensTrainConfig:
    """Budget and optimiser of one lens training (tuned-lens's defaults)."""

    steps: int = DEFAULT_STEPS
    num_sequences: int | None = None  # windows per step (default: 2^18 tokens / seq_len)
    seq_len: int = DEFAULT_SEQ_LEN
    batch_size: int = 1  # windows per forward; accumulated up to num_sequences
    lr_scale: float = 1.0  # lr = lr_scale * (1 - momentum)
    momentum: float = 0.9
    weight_decay: float = 1e-3
    clip: float = 1.0
    seed: int = 42
    checkpoint_every: int = 25
    text_file: str | None = None
    dataset: str | None = None
    precision: str = "bf16"  # tuned-lens's autocast of the lens and head; "fp32": none

    def __post_init__(self):
        if self.precision not in ("bf16", "fp32"):
            raise DepthprobeError(f"--precision must be bf16 or fp32 (got {self.precision!r})")
        for name in ("steps", "seq_len", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1 + (name == "seq_len"):
                raise DepthprobeError(f"--{name.replace('_', '-')} must be at least {1 + (name == 'seq_len')} "
                                      f"(got {getattr(self, name)})")
        if self.num_sequences is None:
            object.__setattr__(self, "num_sequences", max(1, DEFAULT_TOKENS_PER_STEP // self.seq_len))
        if self.num_sequences < 1:
            raise DepthprobeError(f"--num-sequences must be at least 1 (got {self.num_sequences})")
        if self.text_file is not None and self.dataset is not None:
            raise DepthprobeError("give at most one of --text-file and --dataset")

    @property
    def lr(self) -> float:
        return self.lr_scale * (1 - self.momentum)


@dataclass
class LensText:
    """The training windows ``(W, T)`` and where they came from (saved with the lens)."""

    input_ids: torch.Tensor
    info: dict


def lens_text(tokenizer, config: LensTrainConfig, max_positions: int | None = None) -> LensText:
    """The windows a lens trains on (see the module docs), tokenized as one stream."""
    if max_positions is not None and config.seq_len > max_positions:
        raise DepthprobeError(f"--seq-len {config.seq_len} is longer than this model allows ({max_positions}); lower it")
    need = config.steps * config.num_sequences * config.seq_len
    start = 0
    if config.text_file is not None:
        source, text = str(Path(config.text_file).expanduser().resolve()), read_text_file(config.text_file)
    elif config.dataset is not None:
        source, text = f"dataset:{config.dataset}", "\n\n".join(dataset_texts(config.dataset, min_chars=need * 8))
    else:
        source, text, start = BUILTIN, builtin_text(), LENS_RESERVED_TOKENS
    ids = _tokenize_stream(tokenizer, text, need + start)
    usable = (len(ids) - start) // config.seq_len
    if usable < 1:
        raise DepthprobeError(f"{source} has {len(ids)} tokens: not one window of {config.seq_len} after token "
                              f"{start}; give more text (--text-file) or lower --seq-len")
    end = start + usable * config.seq_len
    windows = torch.tensor(ids[start:end], dtype=torch.long).view(usable, config.seq_len)
    epochs = config.steps * config.num_sequences / usable
    description = (f"{source} tokens {start}..{end} ({usable} windows of {config.seq_len}); {config.steps} steps x "
                   f"{config.num_sequences} windows ({config.num_sequences * config.seq_len} tokens/step), "
                   f"{epochs:.2f} epochs, seed {config.seed}")
    hashes = window_hashes(windows[:MAX_HASHES])
    info = {"source": source, "token_start": start, "token_end": end, "windows": usable, "seq_len": config.seq_len,
            "epochs": epochs, "description": description, "window_hashes": hashes,
            "window_hashes_complete": usable <= MAX_HASHES}
    if epochs > 1:
        log.warning("lens training text has %d windows; %d steps x %d windows visit it %.1f times",
                    usable, config.steps, config.num_sequences, epochs)
    return LensText(windows, info)


def step_windows(step: int, config: LensTrainConfig, available: int) -> list[int]:
    """Window indices of step ``step``: global position g -> epoch g // W in ``randperm(seed + epoch)``."""
    out, cache = [], {}
    for g in range(step * config.num_sequences, (step + 1) * config.num_sequences):
        epoch = g // available
        if epoch not in cache:
            cache[epoch] = torch.randperm(available, generator=torch.Generator().manual_seed(config.seed + epoch))
        out.append(int(cache[epoch][g % available]))
    return out


def lens_optimizer(lens: TunedLens, config: LensTrainConfig):
    """tuned-lens's SGD (Nesterov) and its linear decay to 0 with no warmup."""
    opt = torch.optim.SGD(lens.parameters(), lr=config.lr, momentum=config.momentum, nesterov=True,
                          weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (config.steps - s) / max(1, config.steps)))
    return opt, sched


@contextlib.contextmanager
def _frozen(model: torch.nn.Module):
    """The model's parameters need no gradient while the lens trains (flags restored after)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def micro_batch_kl(stack: LayerStack, lens: TunedLens, ids: torch.Tensor, weight: float,
                   precision: str = "fp32") -> list[float]:
    """One micro-batch: the states x_0..x_{L-1} and final log-probs (no grad), then each
    translator's mean KL back-propagated (times ``weight``) on its own (under bfloat16
    autocast with ``precision="bf16"``, as tuned-lens); the KLs."""
    objective = objective_for(stack)
    batch = objective.place(token_batches(ids, len(ids))[0])
    states: dict[int, torch.Tensor] = {}
    with torch.no_grad(), watch_blocks(stack, lambda layer, x_in, x_out: states.__setitem__(layer, x_in.detach())):
        final = torch.log_softmax(objective.logits(objective.forward(batch)).float(), dim=-1)
    p_final = final.exp()
    kls = []
    device = stack.device.type if stack.device.type in ("cuda", "cpu") else "cpu"
    for i in range(len(lens.translators)):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = stack.logits(lens.transform(states[i], i), batch.input_ids)
            kl = (p_final * (final - torch.log_softmax(logits, dim=-1))).sum(-1).mean()
        (kl * weight).backward()
        kls.append(float(kl.detach()))
    return kls


class LensTrainer:
    """Trains (or resumes) a tuned lens for ``stack`` on ``text``; files in ``out_dir`` (rank 0)."""

    def __init__(self, stack: LayerStack, text: LensText, config: LensTrainConfig, out_dir: str | Path | None = None):
        self.stack, self.text, self.config = stack, text, config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.lens = new_lens(stack)
        self.opt, self.sched = lens_optimizer(self.lens, config)
        self.step, self.rows, self.seconds = 0, [], 0.0

    def _meta(self) -> dict:
        c = self.config
        return {"recipe": "tuned-lens 0.2 train_loop (KL, SGD nesterov)", "steps": c.steps,
                "tokens_per_step": c.num_sequences * c.seq_len, "seed": c.seed, "config": asdict(c),
                "text": self.text.info, "steps_done": self.step, "precision": c.precision,
                "train_seconds": round(self.seconds, 3)}

    def resume(self) -> None:
        """Continue from ``out_dir/checkpoint.pt`` (same budget, text and seed), else refuse."""
        path = self.out_dir / CHECKPOINT if self.out_dir is not None else None
        if path is None or not path.is_file():
            raise DepthprobeError(f"--resume: no {CHECKPOINT} in {self.out_dir}; start without --resume")
        state = torch.load(path, map_location=self.stack.device, weights_only=True)
        saved, now = state["meta"], self._meta()
        for key in ("steps", "tokens_per_step", "seed"):
            if saved[key] != now[key]:
                raise DepthprobeError(f"--resume: the checkpoint was made with {key}={saved[key]}, this run asks "
                                      f"{now[key]}; use the same options or start again in a new folder")
        if saved["text"]["description"] != now["text"]["description"]:
            raise DepthprobeError("--resume: the checkpoint trained on other text; give the same text options")
        self.lens.load_state_dict(state["lens"])
        self.opt.load_state_dict(state["optim"])
        self.sched.load_state_dict(state["sched"])
        self.step = int(state["step"])
        self.seconds = float(saved.get("train_seconds", 0.0))
        csv = self.out_dir / TRAIN_CSV
        if csv.is_file():
            self.rows = [r for r in pd.read_csv(csv).to_dict("records") if r["step"] <= self.step]

    def _save(self, final: bool) -> None:
        if self.out_dir is None or not distributed.is_main():
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {"step": self.step, "lens": self.lens.state_dict(), "optim": self.opt.state_dict(),
                 "sched": self.sched.state_dict(), "meta": self._meta()}
        safeio.atomic_write(self.out_dir / CHECKPOINT, lambda p: torch.save(state, p))
        safeio.atomic_write_text(self.out_dir / TRAIN_CSV, pd.DataFrame(self.rows).to_csv(index=False))
        if final:
            save_lens(self.lens, self.out_dir, self.stack, self._meta())

    def fit(self, progress: bool = True, stop_at: int | None = None) -> TunedLens:
        """Train to ``config.steps`` (or ``stop_at``), checkpointing every ``checkpoint_every`` steps."""
        c, (rank, world) = self.config, distributed.rank_and_world()
        last = min(c.steps, stop_at or c.steps)
        bar = tqdm(total=c.steps, initial=self.step, desc="lens train", unit="step",
                   disable=not progress or rank != 0, delay=0.5)
        t0 = time.perf_counter() - self.seconds
        with _frozen(self.stack.model):
            while self.step < last:
                mine = step_windows(self.step, c, len(self.text.input_ids))[rank::world]
                kls = torch.zeros(len(self.lens.translators), dtype=torch.float64)
                for start in range(0, len(mine), c.batch_size):
                    part = mine[start:start + c.batch_size]
                    kls += torch.tensor(micro_batch_kl(self.stack, self.lens, self.text.input_ids[part],
                                                       len(part) / c.num_sequences, c.precision),
                                        dtype=torch.float64) * len(part)
                if world > 1:  # torchrun: each process added its windows' share of the mean
                    for p in self.lens.parameters():
                        _sum_over_processes(p.grad)
                torch.nn.utils.clip_grad_norm_(self.lens.parameters(), c.clip)
                lr = self.opt.param_groups[0]["lr"]
                self.opt.step()
                self.opt.zero_grad(set_to_none=False)
                self.sched.step()
                kls = (_sum_over_processes(kls) if world > 1 else kls).numpy() / c.num_sequences
                self.step += 1
                self.seconds = time.perf_counter() - t0
                self.rows += [{"step": self.step, "layer": i, "kl": float(k), "lr": lr} for i, k in enumerate(kls)]
                bar.update()
                bar.set_postfix(kl=f"{float(kls.mean()):.3f}")
                if not math.isfinite(float(kls.sum())):
                    raise DepthprobeError(f"lens training diverged at step {self.step} (KL not finite)")
                if self.step % c.checkpoint_every == 0 and self.step < c.steps:
                    self._save(final=False)
        bar.close()
        self._save(final=self.step >= c.steps)
        return self.lens.eval()


def _sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """In place, the sum over torchrun's processes (moved to the GPU for nccl)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return tensor
    wire = tensor.to(f"cuda:{torch.cuda.current_device()}") if dist.get_backend() == "nccl" else tensor
    dist.all_reduce(wire, op=dist.ReduceOp.SUM)
    if wire is not tensor:
        tensor.copy_(wire.to(tensor.device))
    return tensor


def quick_lens(stack: LayerStack, tokenizer, progress: bool = True) -> tuple[TunedLens, dict]:
    """A lens trained now with :data:`QUICK_BUDGET` on the built-in text (past the calibration
    tokens), for ``analyze --metrics tuned-lens`` without ``--lens``."""
    seq_len = QUICK_BUDGET["seq_len"]
    limit = getattr(getattr(stack.model, "config", None), "max_position_embeddings", None)
    config = LensTrainConfig(steps=QUICK_BUDGET["steps"], num_sequences=QUICK_BUDGET["num_sequences"],
                             seq_len=min(seq_len, limit) if isinstance(limit, int) else seq_len, checkpoint_every=10**9)
    trainer = LensTrainer(stack, lens_text(tokenizer, config), config)
    lens = trainer.fit(progress=progress)
    return lens, trainer._meta()
