"""Close the seams pruning leaves: repair (``repair.py``) then heal (``heal.py``), scored on held-out text.

``prune`` calls :func:`before_removal` while the chosen blocks are still in the model (the
repair curve needs every K, and the maps are fit against the full model's stream), then
:func:`after_removal` on the smaller model (healing trains what will be exported). Every
loss here is ``evaluate.heldout.heldout_loss`` on the run's one set of held-out windows,
which neither the calibration, the repair fit nor the healing text touch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from torch import nn

from depthprobe.data import BUILTIN, Windows, heldout_windows, make_windows
from depthprobe.errors import DepthprobeError
from depthprobe.evaluate.heldout import heldout_loss
from depthprobe.model.stack import LayerStack
from depthprobe.prune.heal import HealConfig, heal_lora, training_windows
from depthprobe.prune.repair import RepairConfig, removed_spans, repair_curve, repair_linear


@dataclass(frozen=True)
class SeamOptions:
    repair: str | None = None  # "linear" | "cosine"
    heal: str | None = None  # "lora"
    #: windows (of the calibration length) the maps are fit on; the last 20% validate
    repair_windows: int = 64
    #: ridges tried on the validation windows (the best kept)
    ridges: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    #: also a map in the first kept block after each span (``RepairConfig.after``)
    repair_after: bool = False
    heal_config: HealConfig = field(default_factory=HealConfig)
    heal_text_file: str | None = None
    batch_size: int = 4

    def __post_init__(self):
        if self.repair_windows < 2:
            raise DepthprobeError("--repair-windows must be at least 2")


@dataclass
class SeamReport:
    heldout_source: str
    heldout_full: float
    heldout_plain: float = math.nan
    heldout_repaired: float = math.nan
    heldout_healed: float = math.nan
    #: num_removed, heldout_loss_plain, heldout_loss_repaired, repair_spans_applied
    curve: pd.DataFrame | None = None
    #: the chosen K's spans: start, stop, writer, fit_tokens, val losses, applied, reason
    spans: pd.DataFrame | None = None
    #: step, loss of the healing run
    heal_losses: pd.DataFrame | None = None
    _heldout: Windows | None = field(default=None, repr=False)

    @property
    def final(self) -> float:
        """Held-out loss of the model as exported (healed, else repaired, else plain removal)."""
        for value in (self.heldout_healed, self.heldout_repaired, self.heldout_plain):
            if not math.isnan(value):
                return value
        return math.nan

    def recovered(self, value: float) -> float:
        """Fraction of the held-out gap closed: (plain − value) / (plain − full)."""
        gap = self.heldout_plain - self.heldout_full
        return (self.heldout_plain - value) / gap if gap > 0 else math.nan

    def summary(self) -> dict:
        return {"heldout_source": self.heldout_source, "heldout_loss_full": self.heldout_full,
                "heldout_loss_removed": self.heldout_plain, "heldout_loss_repaired": self.heldout_repaired,
                "heldout_loss_healed": self.heldout_healed, "heldout_loss_final": self.final,
                "repair_recovered": self.recovered(self.heldout_repaired),
                "heal_recovered": self.recovered(self.heldout_healed)}

    def save(self, out: Path) -> None:
        for name, frame in (("repair_curve", self.curve), ("repair_spans", self.spans), ("heal_losses", self.heal_losses)):
            if frame is not None:
                frame.to_csv(out / f"{name}.csv", index=False, float_format="%.10g")


def fit_windows(tokenizer, calibration: Windows, options: SeamOptions, max_positions: int | None = None) -> Windows:
    """The windows repair maps are fit on: ``options.repair_windows`` windows of the calibration's
    text and length (the calibration windows are their prefix); the calibration itself without repair."""
    num = options.repair_windows if options.repair else 0
    if num <= calibration.num_sequences or calibration.source == "text":
        return calibration
    source = calibration.source
    kwargs = {} if source == BUILTIN else (
        {"dataset": source.removeprefix("dataset:")} if source.startswith("dataset:") else {"text_file": source})
    try:
        return make_windows(tokenizer, num_sequences=num, seq_len=calibration.seq_len, max_positions=max_positions,
                            **kwargs)
    except DepthprobeError as exc:
        raise DepthprobeError(f"{exc}; or lower --repair-windows") from exc


def check_causal(model: nn.Module, options: SeamOptions) -> None:
    """Repair and healing are judged by held-out next-token loss: refuse a model without an LM head."""
    if (options.repair or options.heal) and not LayerStack.from_model(model).is_causal_lm:
        what = "--heal" if options.heal else "--repair"
        raise DepthprobeError(f"{what} is judged by held-out next-token loss and needs a causal LM; "
                              "this model has no LM head")


def before_removal(model: nn.Module, remove: Sequence[int], removed_by_k: dict[int, list[int]], fit: Windows,
                   heldout: Windows, options: SeamOptions, *, scored: dict[tuple[int, ...], float] | None = None,
                   progress: bool = True) -> SeamReport:
    """Held-out losses of the full model and of plain removal; with ``options.repair``, the
    repair curve over ``removed_by_k`` and the chosen K's maps fused into ``model`` (kept).

    ``heldout``: the run's held-out windows (disjoint from ``fit``); ``scored``: held-out losses
    already measured on them, by sorted removed blocks (``()`` the full model), reused as they are.
    """
    check_causal(model, options)
    scored = dict(scored or {})

    def plain(removed: Sequence[int]) -> float:
        key = tuple(sorted(removed))
        if key not in scored:
            scored[key] = heldout_loss(model, heldout, key, options.batch_size)
        return scored[key]

    report = SeamReport(heldout.source, plain(()), plain(remove), _heldout=heldout)
    if options.repair:
        config = RepairConfig(method=options.repair, ridges=options.ridges, batch_size=options.batch_size,
                              after=options.repair_after)
        report.curve = repair_curve(model, removed_by_k, fit, heldout, config, progress, plain=plain)
        report.spans = repair_linear(model, remove, fit, config, progress=progress).table
    return report


def after_removal(model: nn.Module, tokenizer, remove: Sequence[int], report: SeamReport,
                  options: SeamOptions, *, checkpoint_dir: str | Path | None = None, progress: bool = True) -> None:
    """On the pruned model: its repaired held-out loss, then (``options.heal``) heal and score."""
    heldout = report._heldout
    if options.repair:
        report.heldout_repaired = heldout_loss(model, heldout, (), options.batch_size)
    if options.heal:
        train = training_windows(tokenizer, seq_len=heldout.seq_len, exclude_tail_tokens=heldout.input_ids.numel(),
                                 text_file=options.heal_text_file)
        if heldout.source.startswith(f"heldout:{BUILTIN}[") and train.source == BUILTIN:
            # the shared contract asserts the held-out windows never touch these
            heldout_windows(tokenizer, num_sequences=heldout.num_sequences, seq_len=heldout.seq_len, calibration=train)
        seams = [stop - sum(1 for i in remove if i < stop) for _, stop in removed_spans(remove)]
        result = heal_lora(model, train, seams, options.heal_config, checkpoint_dir=checkpoint_dir, progress=progress)
        report.heal_losses = result.losses
        report.heldout_healed = heldout_loss(model, heldout, (), options.batch_size)


def curve_steps(table: pd.DataFrame | None, strategy: str, remove: Sequence[int]) -> dict[int, list[int]]:
    """K -> removed blocks along ``strategy``'s curve (just the chosen K for ``manual``)."""
    steps = {len(remove): sorted(remove)}
    if table is not None and strategy in set(table["strategy"]):
        for row in table[(table["strategy"] == strategy) & (table["num_removed"] > 0)].itertuples():
            steps[int(row.num_removed)] = [int(i) for i in str(row.removed).split(";") if i]
    return steps


def merge_curve(table: pd.DataFrame | None, report: SeamReport | None, strategy: str) -> pd.DataFrame | None:
    """``prune_curve.csv`` with the repair columns filled on ``strategy``'s rows (NaN elsewhere)."""
    if table is None or report is None or report.curve is None:
        return table
    extra = report.curve.assign(strategy=strategy)
    if report.heal_losses is not None:
        k = max(report.curve["num_removed"])
        extra["heldout_loss_healed"] = [report.heldout_healed if n == k else math.nan for n in extra["num_removed"]]
    return table.merge(extra, on=["strategy", "num_removed"], how="left")
