"""Train one small LM and record, every ``diag_every`` steps, how each block is doing.

The loop is plain: AdamW, linear warmup then cosine decay to ``min_lr_ratio`` x the peak,
gradient clipping, gradient accumulation, bf16 autocast where the device supports it.
One seed fixes the initial weights and the order of the training windows.

Outputs in ``out_dir`` (rank 0 only):

- ``metrics.csv``: ``step, train_loss, val_loss, lr, grad_norm, tokens_per_s`` (``step`` is
  the number of optimizer steps done; ``val_loss`` only where evaluated).
- ``train_layers.csv``: ``step, layer, grad_norm, grad_norm_attn, grad_norm_mlp,
  activation_variance, angular_distance`` on diagnostic steps (same definitions as
  ``depthprobe analyze``, measured on the step's first micro-batch, gradients before
  clipping).
- ``config.json`` (model, train and data configs), ``run.json`` (outcome), ``checkpoint.pt``
  and ``model/`` (``save_pretrained`` + tokenizer: ``depthprobe analyze DIR/model`` loads it).

Every file is written to a temporary name and moved into place (``os.replace``), so an
interrupted run never leaves half a checkpoint. A NaN or infinite loss or gradient norm
marks the run diverged: the step is not applied, what exists is saved, and the run stops.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DDP (gloo on
CPU, nccl on GPU); each process takes its rows of the same global batch.

Example:
    >>> from depthprobe.train.trainer import train, TrainConfig
    >>> from depthprobe.train.model import ModelConfig, PRESETS
    >>> result = train(ModelConfig(**PRESETS["tiny"], norm_placement="mix"),
    ...                TrainConfig(steps=100, seed=0), out_dir="runs/mix")   # doctest: +SKIP
    >>> result.final_val_loss                                               # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from depthprobe import safeio
from depthprobe.distributed import dist_info, init_from_env
from depthprobe.errors import DepthprobeError
from depthprobe.model.load import resolve_device
from depthprobe.model.stack import LayerStack
from depthprobe.probes import metrics as M
from depthprobe.probes.hooks import watch_blocks
from depthprobe.results import write_json
from depthprobe.runs import MODEL_DIR
from depthprobe.train.config import (  # noqa: F401  (re-exported: the run's config and result)
    CHECKPOINT,
    LAYER_COLUMNS,
    METRIC_COLUMNS,
    TrainConfig,
    TrainResult,
    lr_factor,
)
from depthprobe.train.data import DataConfig, TokenData, load_data
from depthprobe.train.model import DepthprobeLMForCausalLM, ModelConfig, build_model

log = logging.getLogger(__name__)

class Trainer:
    """One training run; :meth:`fit` trains (or resumes) to ``config.steps``.

    Args:
        model_config: shape and norm placement (``vocab_size`` follows the tokenizer).
        config: optimisation, schedule, seeds, diagnostics.
        data_config: where the tokens come from.
        out_dir: where to write; ``None`` writes nothing (benchmarks, tests).
        resume: continue from ``out_dir/checkpoint.pt``.
        data: ready-made :class:`TokenData` and tokenizer (comparisons load the corpus once).
    """

    def __init__(
        self,
        model_config: ModelConfig,
        config: TrainConfig,
        data_config: DataConfig | None = None,
        out_dir: str | Path | None = None,
        *,
        resume: bool = False,
        progress: bool = True,
        data: tuple[TokenData, object] | None = None,
    ):
        self.config, self.data_config = config, data_config or DataConfig()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self._own_pg = init_from_env(config.device)
        self.dist = dist_info()
        self._place(config)
        self.progress = progress and self.dist.main

        if data is None:
            data = load_data(self.data_config, config.seq_len, config.seed)
        self.data, self.tokenizer = data
        if self.data.seq_len != config.seq_len:
            raise DepthprobeError("the data windows were cut for another --seq-len")
        vocab = len(self.tokenizer)
        self.model_config = dataclasses.replace(
            model_config, vocab_size=vocab, max_position_embeddings=max(model_config.max_position_embeddings, config.seq_len)
        )
        self.model: DepthprobeLMForCausalLM = build_model(self.model_config, config.seed).to(self.device)
        self.stack = LayerStack.from_model(self.model)
        self.optimizer = _optimizer(self.model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, config))
        self.step = 0
        self.metric_rows: list[dict] = []
        self.layer_rows: list[dict] = []
        self.diverged = False
        if resume:
            self._load_checkpoint()
        self.ddp = None
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)

    def _place(self, config: TrainConfig) -> None:
        """This process's device, micro-batch and autocast."""
        if self.dist.world > 1 and config.device in ("auto", "cuda") and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{self.dist.local_rank}")
        else:
            self.device = resolve_device(config.device)
        per_step = config.batch_size // (self.dist.world * config.grad_accum)
        if per_step * self.dist.world * config.grad_accum != config.batch_size:
            raise DepthprobeError(
                f"--batch-size {config.batch_size} must divide into {self.dist.world} process(es) x "
                f"{config.grad_accum} accumulation step(s)"
            )
        self.micro_batch = per_step
        self.bf16 = config.precision == "bf16" or (
            config.precision == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        )

    # ------------------------------------------------------------------ the loop
    def fit(self, stop_at: int | None = None) -> TrainResult:
        """Train until ``config.steps`` (or ``stop_at`` steps, as if interrupted there)."""
        cfg = self.config
        end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
        t_start = time.perf_counter()
        if self.dist.main and self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._write_config()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", disable=not self.progress, leave=False)
        ctrl_c = threading.Event()
        # DDP ranks could see Ctrl-C at different steps and wait on each other: graceful stop alone
        with _stop_at_step_boundary(ctrl_c, enabled=self.dist.world == 1):
            try:
                while self.step < end and not self.diverged and not ctrl_c.is_set():
                    row = self._train_step()
                    if self.diverged:
                        log.warning("loss or gradient is not finite at step %d: run marked diverged", self.step + 1)
                        self.metric_rows.append(row)
                        break
                    self.step += 1
                    last = self.step == cfg.steps
                    if self.dist.main and _due(self.step, cfg.eval_every, last):
                        row["val_loss"] = self.evaluate()
                    self.metric_rows.append(row)
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['train_loss']:.3f}")
                    if _due(self.step, cfg.ckpt_every, last) or self.step == end:
                        self.save_checkpoint()
            finally:
                bar.close()
        stopped_early = ctrl_c.is_set() and self.step < end and not self.diverged
        if stopped_early:  # here, not in the loop: the flag may be set after the loop's last save check
            self.save_checkpoint()
        result = self._result(time.perf_counter() - t_start)
        if self.dist.main and self.out_dir is not None:
            self._write_outputs(result, finished=self.step == cfg.steps)
        if self._own_pg:
            dist.destroy_process_group()
        if stopped_early:
            where = f"; checkpoint in {self.out_dir}/, continue with --resume" if self.out_dir is not None else ""
            raise DepthprobeError(f"interrupted (Ctrl-C) after step {self.step}{where}")
        return result

    def _train_step(self) -> dict:
        cfg, step = self.config, self.step
        diagnose = self.dist.main and cfg.diag_every > 0 and (_due(step + 1, cfg.diag_every, step + 1 == cfg.steps) or step == 0)
        module = self.ddp or self.model
        self.model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        acts: dict[int, list[float]] = {}
        for micro in range(cfg.grad_accum):
            start = (self.dist.rank * cfg.grad_accum + micro) * self.micro_batch
            ids = self.data.batch(step, cfg.batch_size, slice(start, start + self.micro_batch)).to(self.device)
            watch = watch_blocks(self.stack, _activation_recorder(acts)) if diagnose and micro == 0 else contextlib.nullcontext()
            sync = module.no_sync() if self.ddp is not None and micro < cfg.grad_accum - 1 else contextlib.nullcontext()
            with sync, watch, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = module(input_ids=ids, labels=ids).loss / cfg.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        if self.ddp is not None:
            dist.all_reduce(loss_sum)  # SUM: gloo has no AVG
            loss_sum /= self.dist.world
        layer_rows = self._layer_rows(step + 1, acts) if diagnose else []  # before clipping
        params = list(self.model.parameters())
        if cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        else:
            grad_norm = M.grad_l2(params)
        train_loss = float(loss_sum)
        row = {"step": step + 1, "train_loss": train_loss, "val_loss": math.nan, "lr": self.scheduler.get_last_lr()[0]}
        if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
            self.diverged = True
            self.optimizer.zero_grad(set_to_none=True)
            return {**row, "grad_norm": grad_norm, "tokens_per_s": math.nan}
        self.layer_rows.extend(layer_rows)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        return {**row, "grad_norm": grad_norm, "tokens_per_s": cfg.batch_size * cfg.seq_len / seconds}

    def _layer_rows(self, step: int, acts: dict[int, list[float]]) -> list[dict]:
        """Per-block gradient norms and the activation statistics of micro-batch 0."""
        rows = []
        for layer, block in enumerate(self.stack.blocks):
            var_sum, ang_sum, n = acts.get(layer, (math.nan, math.nan, 1))
            sub = {
                kind: M.grad_l2([p for m in self.stack.sublayer_modules(layer, kind) for p in m.parameters()])
                for kind in ("attn", "mlp")
            }
            rows.append(
                {
                    "step": step,
                    "layer": layer,
                    "grad_norm": M.grad_l2(block.parameters()),
                    "grad_norm_attn": sub["attn"],
                    "grad_norm_mlp": sub["mlp"],
                    "activation_variance": var_sum / n,
                    "angular_distance": ang_sum / n,
                }
            )
        return rows

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss over the held-out windows (rank 0's model, no DDP)."""
        self.model.eval()
        nll, count = 0.0, 0
        for start in range(0, self.data.val.shape[0], self.micro_batch):
            ids = self.data.val[start : start + self.micro_batch].to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.model(input_ids=ids).logits
            s, c = M.next_token_nll_sum(logits, ids)
            nll, count = nll + float(s), count + c
        self.model.train()
        return nll / count

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        """Everything a resume needs; written atomically, on rank 0 only."""
        if not self.dist.main or self.out_dir is None:
            return
        state = {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": _numpy_state(),
                "python": list(random.getstate()[1]),
            },
            "metric_rows": self.metric_rows,
            "layer_rows": self.layer_rows,
            "config": self._config_dict(),
        }
        safeio.atomic_write(self.out_dir / CHECKPOINT, lambda tmp: torch.save(state, tmp))
        self._write_tables()

    def _load_checkpoint(self) -> None:
        path = self.out_dir / CHECKPOINT if self.out_dir is not None else None
        if path is None or not path.is_file():
            raise DepthprobeError(f"--resume: no {CHECKPOINT} in {self.out_dir}; start without --resume")
        state = safeio.load_checkpoint(path, map_location=self.device)
        saved = state["config"]
        # a field added to ModelConfig after the checkpoint was written counts at its default
        defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
        if {**defaults, **saved["model"]} != dataclasses.asdict(self.model_config) or saved["train"]["seed"] != self.config.seed:
            raise DepthprobeError(f"--resume: {path} was written with another model or seed; use the same options")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.metric_rows = list(state["metric_rows"])
        self.layer_rows = list(state["layer_rows"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        np.random.set_state(("MT19937", np.asarray(rng["numpy"]["keys"], dtype=np.uint32), rng["numpy"]["pos"], 0, 0.0))
        random.setstate((3, tuple(rng["python"]), None))
        log.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ outputs
    def _config_dict(self) -> dict:
        return {
            "model": dataclasses.asdict(self.model_config),
            "train": dataclasses.asdict(self.config),
            "data": dataclasses.asdict(self.data_config),
            "world_size": self.dist.world,
            "micro_batch": self.micro_batch,
        }

    def _write_config(self) -> None:
        safeio.atomic_write(self.out_dir / "config.json", lambda tmp: write_json(tmp, self._config_dict()))

    def _write_tables(self) -> None:
        metrics = pd.DataFrame(self.metric_rows, columns=METRIC_COLUMNS)
        layers = pd.DataFrame(self.layer_rows, columns=LAYER_COLUMNS)
        safeio.atomic_write(self.out_dir / "metrics.csv", lambda tmp: metrics.to_csv(tmp, index=False, float_format="%.8g"))
        safeio.atomic_write(self.out_dir / "train_layers.csv", lambda tmp: layers.to_csv(tmp, index=False, float_format="%.8g"))

    def _write_outputs(self, result: TrainResult, finished: bool) -> None:
        self._write_tables()
        finite = all(bool(torch.isfinite(p).all()) for p in self.model.parameters())
        if finite:
            model_dir = self.out_dir / MODEL_DIR
            tmp = safeio.temp_path(model_dir)  # a later run recognises and removes it if we are killed
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            if model_dir.exists():
                import shutil

                shutil.rmtree(model_dir)
            os.replace(tmp, model_dir)
        status = {
            "steps_done": result.steps_done,
            "steps": self.config.steps,
            "finished": finished,
            "diverged": result.diverged,
            "final_val_loss": result.final_val_loss,
            "final_val_ppl": result.final_val_ppl,
            "model_saved": finite,
            "seconds": result.seconds,
            "num_parameters": int(sum(p.numel() for p in self.model.parameters())),
            "device": str(self.device),
            "bf16_autocast": self.bf16,
            "corpus": self.data.source,
        }
        safeio.atomic_write(self.out_dir / "run.json", lambda tmp: write_json(tmp, status))

    def _result(self, seconds: float) -> TrainResult:
        vals = [r["val_loss"] for r in self.metric_rows if math.isfinite(r["val_loss"])]
        final = math.nan if self.diverged or not vals else vals[-1]
        return TrainResult(
            steps_done=self.step,
            diverged=self.diverged,
            final_val_loss=final,
            metrics=pd.DataFrame(self.metric_rows, columns=METRIC_COLUMNS),
            layers=pd.DataFrame(self.layer_rows, columns=LAYER_COLUMNS),
            seconds=seconds,
            out_dir=self.out_dir,
        )


def train(
    model_config: ModelConfig,
    config: TrainConfig,
    data_config: DataConfig | None = None,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train one model; see :class:`Trainer` and the module docs for the outputs."""
    return Trainer(model_config, config, data_config, out_dir, resume=resume, progress=progress).fit()


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms or biases)."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": matrices, "weight_decay": config.weight_decay}, {"params": vectors, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(config.beta1, config.beta2),
    )


def _due(step: int, every: int, last: bool) -> bool:
    return last or (every > 0 and step % every == 0)


def _activation_recorder(acts: dict[int, list[float]]):
    def record(layer: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        n = x_out.shape[0] * x_out.shape[1]
        acts[layer] = [M.variance_sum(x_out), M.angular_sum(x_in, x_out), n]

    return record


def _numpy_state() -> dict:
    _, keys, pos, *_ = np.random.get_state()
    return {"keys": keys.tolist(), "pos": int(pos)}


@contextlib.contextmanager
def _stop_at_step_boundary(flag: threading.Event, enabled: bool):
    """While training, the first Ctrl-C sets ``flag`` (the loop finishes its step, saves a
    checkpoint and stops); a second one interrupts at once, as usual."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def first_ctrl_c(signum, frame):
        flag.set()
        signal.signal(signal.SIGINT, previous)
        log.warning("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to quit now)")

    previous = signal.signal(signal.SIGINT, first_ctrl_c)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is first_ctrl_c:
            signal.signal(signal.SIGINT, previous)
