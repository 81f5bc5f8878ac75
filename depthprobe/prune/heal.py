"""Heal a pruned model with LoRA (peft) and merge it into plain weights.

Gromov et al. (2024) and Shortened LLaMA heal the seam removal leaves with a short LoRA
fine-tune on the MLPs. Here: low-rank adapters (rank ``r``, scale ``alpha / r``) on the MLP
linears of the blocks on both sides of each seam (or of every block, or modules named by
the user), trained on next-token loss over text that never includes the held-out windows,
then merged (``W ← W + (alpha/r) B A``) so the model keeps its original modules and loads
with plain ``AutoModelForCausalLM``. A checkpoint (adapters, optimizer, step, losses) is
written every ``save_every`` steps and a rerun with the same settings resumes from it.

Example:
    >>> result = heal_lora(model, train_windows, seams=[12], config=HealConfig(steps=100))  # doctest: +SKIP
    >>> result.losses.tail()                                                                # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from tqdm.auto import tqdm

from depthprobe.data import BUILTIN, Windows, builtin_text, make_windows, read_text_file
from depthprobe.errors import DepthprobeError
from depthprobe.evaluate.cloze import CONTEXT_WORDS
from depthprobe.model.stack import LayerStack

log = logging.getLogger(__name__)

HEAL_METHODS = ("lora",)
CHECKPOINT = "heal_checkpoint.pt"


@dataclass(frozen=True)
class HealConfig:
    steps: int = 100
    rank: int = 8
    alpha: float = 16.0
    lr: float = 5e-4
    #: "seams": MLPs of the kept blocks on both sides of each seam; "mlp": every block's MLP;
    #: otherwise a comma list of module-name suffixes (``down_proj,up_proj``)
    targets: str = "seams"
    batch_size: int = 4
    save_every: int = 25
    seed: int = 0
    #: stop early once this run has used this much process CPU time (None: no limit)
    max_cpu_seconds: float | None = None

    def __post_init__(self):
        if self.steps < 1 or self.rank < 1 or self.batch_size < 1 or self.save_every < 1:
            raise DepthprobeError("--heal-steps, --heal-rank and the batch size must be at least 1")
        if not self.lr > 0:
            raise DepthprobeError(f"the healing learning rate must be positive (got {self.lr})")


@dataclass
class HealResult:
    #: step, loss (mean-token training loss of that step's batch)
    losses: pd.DataFrame
    target_modules: list[str]
    resumed_from: int


def _linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def target_modules(model: nn.Module, seams: Sequence[int], targets: str = "seams") -> list[str]:
    """Full names of the linears LoRA adapts (see :class:`HealConfig` ``targets``).

    ``seams``: index (in the pruned model) of the first block after each removed span.
    """
    stack = LayerStack.from_model(model)
    names = {id(m): n for n, m in model.named_modules()}
    if targets in ("seams", "mlp"):
        layers = range(len(stack)) if targets == "mlp" else sorted(
            {j for s in seams for j in (s - 1, s) if 0 <= j < len(stack)})
        found = []
        for layer in layers:
            for part in stack.sublayer_modules(layer, "mlp"):
                found += [names[id(m)] for m in part.modules() if _linear_like(m)]
    else:
        suffixes = [s.strip() for s in targets.split(",") if s.strip()]
        found = [n for n, m in model.named_modules() if _linear_like(m) and any(
            n == s or n.endswith("." + s) for s in suffixes)]
    if not found:
        raise DepthprobeError(f"--heal-modules {targets!r} matches no linear layer of this model; "
                              "use seams, mlp, or module names such as down_proj,up_proj")
    return sorted(set(found))


def training_windows(tokenizer, *, seq_len: int, exclude_tail_tokens: int, text_file: str | None = None) -> Windows:
    """Every full window of ``text_file``, or of the built-in text's first half: the built-in
    cloze task's items (contexts included) come from its second half and the held-out windows
    from its last ``exclude_tail_tokens`` tokens, so healing touches neither. Built the way
    calibration windows are (``make_windows``), so ``heldout_windows(calibration=...)`` can
    assert the two never touch."""
    if text_file is not None:
        source, text = str(text_file), read_text_file(text_file)
        usable = len(tokenizer(text, add_special_tokens=False)["input_ids"]) // seq_len
    else:
        source, text = BUILTIN, builtin_text()
        words = text.split()
        head = " ".join(words[: len(words) // 2 - CONTEXT_WORDS])
        total = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        usable = min(len(tokenizer(head, add_special_tokens=False)["input_ids"]), total - exclude_tail_tokens)
        usable = usable // seq_len - 2  # margin: the stream's whitespace differs from the joined words
    if usable < 1:
        raise DepthprobeError(f"{source} has too few tokens for one healing window of {seq_len}; give a longer "
                              "--heal-text-file")
    return make_windows(tokenizer, num_sequences=usable, seq_len=seq_len, text_file=text_file)


def heal_lora(model: nn.Module, windows: Windows, seams: Sequence[int], config: HealConfig | None = None, *,
              checkpoint_dir: str | Path | None = None, progress: bool = True) -> HealResult:
    """Train LoRA adapters on ``windows`` for ``config.steps`` steps and merge them into ``model``.

    Batches go through the windows in order (wrapping), so a resumed run sees the same data.
    """
    config = config or HealConfig()
    names = target_modules(model, seams, config.targets)
    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=names, lora_dropout=0.0, bias="none",
                      fan_in_fan_out=any(type(model.get_submodule(n)).__name__ == "Conv1D" for n in names))
    peft_model = get_peft_model(model, lora)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    session = _Session(peft_model, optimizer, config, names, path)
    losses, start = _resume(session)
    try:
        losses = _train(session, windows, start, losses, progress)
    except BaseException:
        peft_model.unload()  # the model as it was; the checkpoint keeps the progress
        model.eval()
        raise
    peft_model.merge_and_unload()  # LoRA folded into the weights; the modules are plain again
    model.eval()
    return HealResult(pd.DataFrame({"step": range(1, len(losses) + 1), "loss": losses}), names, start)


@dataclass
class _Session:
    """One healing run: the LoRA model, its optimizer, the settings and where it checkpoints."""

    peft_model: nn.Module
    optimizer: torch.optim.Optimizer
    config: HealConfig
    names: list[str]  # the adapted modules
    path: Path | None  # the checkpoint (None: none kept)


def _train(session: _Session, windows: Windows, start: int, losses: list[float], progress: bool) -> list[float]:
    peft_model, optimizer, config, path = session.peft_model, session.optimizer, session.config, session.path
    ids = windows.input_ids
    device = next(peft_model.parameters()).device
    peft_model.train()
    bar = tqdm(range(start, config.steps), desc="heal (LoRA)", disable=not progress, initial=start,
               total=config.steps, leave=False)
    began = time.process_time()
    for step in bar:
        if config.max_cpu_seconds is not None and time.process_time() - began > config.max_cpu_seconds:
            log.info("healing stopped after %d steps: CPU budget of %.0f s spent", step, config.max_cpu_seconds)
            if path is not None:
                _save(session, losses)
            break
        rows = [(step * config.batch_size + i) % ids.shape[0] for i in range(config.batch_size)]
        batch = ids[rows].to(device)
        loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
        if not torch.isfinite(loss):
            raise DepthprobeError(f"healing diverged at step {step + 1} (loss {loss.item()}); lower the learning rate")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if path is not None and ((step + 1) % config.save_every == 0 or step + 1 == config.steps):
            _save(session, losses)
    return losses


def _fingerprint(config: HealConfig, names: list[str]) -> dict:
    return {**{k: v for k, v in asdict(config).items() if k != "save_every"}, "modules": ",".join(names)}


def _save(session: _Session, losses: list[float]) -> None:
    path = session.path
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"step": len(losses), "losses": list(losses), "config": _fingerprint(session.config, session.names),
             "lora": get_peft_model_state_dict(session.peft_model), "optimizer": session.optimizer.state_dict()}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # never a half-written checkpoint


def _resume(session: _Session) -> tuple[list[float], int]:
    path = session.path
    if path is None or not path.is_file():
        return [], 0
    state = torch.load(path, weights_only=True)
    if state["config"] != _fingerprint(session.config, session.names):
        raise DepthprobeError(f"{path} was written with other healing settings; delete it or use the same ones")
    set_peft_model_state_dict(session.peft_model, state["lora"])
    session.optimizer.load_state_dict(state["optimizer"])
    log.info("healing resumes at step %d from %s", state["step"], path)
    return list(state["losses"]), int(state["step"])
