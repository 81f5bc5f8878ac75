"""Why DyT stalls here: short runs of the campaign's model (seed 0, 144 steps, the first 48
warmup) under the variations of the DyT recipe that the paper offers, beside Pre-LN.

Zhu et al. 2025 ("Transformers without Normalization") train LLaMA with DyT by (1) giving the
attention-input DyT a larger alpha0 than the other DyT layers (MLP input and final), tuned by
width (wider models want smaller alpha0), and (2) a learnable scalar after the embedding,
initialised to sqrt(d). Each probe changes one thing: alpha0 pair, the embedding scalar (none,
sqrt(d), or 50 = 1/initializer_range so that the embeddings have RMS about 1), or half the
learning rate. Per run: final and best validation loss; the first diagnostic step where every
block's gradient is exactly 0 (the final DyT's tanh saturated, so nothing reaches the blocks);
the last block's activation variance over the first's at the last diagnostic step; and, in the
final model on the held-out windows, the share of the last block's output energy that lies in
one direction shared by every token, ||mean_t h_t||^2 / mean_t ||h_t||^2 (1 = every token's
state is the same vector, so the model can only predict one distribution).

Runs go to ``--runs`` (resumable: a finished run is read, not retrained); the table and page
to ``--out``.

    .venv/bin/python analyses/dyt_alpha0_probe.py [--runs out/dyt_alpha0_probe] [--out reports/dyt_alpha0_probe]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import depthprobe  # noqa: E402
from analyses import _common as C  # noqa: E402
from depthprobe.train.data import DataConfig, load_data  # noqa: E402
from depthprobe.train.trainer import CHECKPOINT, Trainer  # noqa: E402

NAME = "dyt_alpha0_probe"
STEPS = 144
#: name -> (variant, model overrides, lr)
PROBES = {
    "pre": ("pre", {}, 2e-3),
    "dyt a0.5/0.5 no scalar": ("dyt", dict(dyt_alpha0=0.5, dyt_alpha0_attn=0.5, dyt_embed_scale=False), 2e-3),
    "dyt a0.5/0.5 scalar sqrt(d)": ("dyt", dict(dyt_alpha0=0.5, dyt_alpha0_attn=0.5), 2e-3),
    "dyt a1.0/0.5 scalar sqrt(d) (campaign)": ("dyt", dict(dyt_alpha0=0.5, dyt_alpha0_attn=1.0), 2e-3),
    "dyt a0.2/0.05 scalar sqrt(d)": ("dyt", dict(dyt_alpha0=0.05, dyt_alpha0_attn=0.2), 2e-3),
    "dyt a1.0/0.5 scalar sqrt(d) lr 1e-3": ("dyt", dict(dyt_alpha0=0.5, dyt_alpha0_attn=1.0), 1e-3),
    "dyt a1.0/0.5 scalar 50": ("dyt", dict(dyt_alpha0=0.5, dyt_alpha0_attn=1.0, dyt_embed_scale_init=50.0), 2e-3),
}


def folder_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in name)


def train_probe(name: str, runs: Path, setting: dict, data, steps: int) -> Path:
    """Train one probe (resuming a stopped one); returns its run folder."""
    variant, overrides, lr = PROBES[name]
    model_cfg, train_cfg = C.RunSpec("main", variant, 0, lr, steps).configs(dict(setting, steps=steps))
    model_cfg = dataclasses.replace(model_cfg, **overrides)
    out = runs / folder_name(name)
    status = out / "run.json"
    if status.is_file() and json.loads(status.read_text()).get("finished"):
        return out
    data_cfg = DataConfig(max_tokens=setting["max_tokens"], val_windows=setting["val_windows"])
    Trainer(model_cfg, train_cfg, data_cfg, out, resume=(out / CHECKPOINT).is_file(), progress=False, data=data).fit()
    return out


@torch.no_grad()
def shared_direction_share(folder: Path, val: torch.Tensor) -> float:
    """||mean_t h_t||^2 / mean_t ||h_t||^2 of the last block's output over the windows ``val``."""
    model, _ = depthprobe.load_model(str(folder / "model"), device="cpu")
    out = []
    handle = model.model.layers[-1].register_forward_hook(lambda m, a, o: out.append(o.reshape(-1, o.shape[-1])))
    model(input_ids=val)
    handle.remove()
    h = torch.cat(out).double()
    return float(h.mean(0).pow(2).sum() / h.pow(2).sum(-1).mean())


def probe_row(name: str, folder: Path, windows: torch.Tensor) -> dict:
    """The measures of one finished probe (see the module docstring)."""
    variant, overrides, lr = PROBES[name]
    val = pd.read_csv(folder / "metrics.csv").dropna(subset=["val_loss"])
    layers = pd.read_csv(folder / "train_layers.csv")
    dead = sorted(step for step, g in layers[layers.step > 1].groupby("step") if (g.grad_norm == 0).all())
    last = layers[layers.step == layers.step.max()].sort_values("layer")
    return {"probe": name, "variant": variant, "lr": lr, **{k: overrides.get(k, "") for k in
            ("dyt_alpha0_attn", "dyt_alpha0", "dyt_embed_scale", "dyt_embed_scale_init")},
            "final_val_loss": float(val.val_loss.iloc[-1]), "best_val_loss": float(val.val_loss.min()),
            "all_block_grads_zero_from_step": dead[0] if dead else "",
            "last_block_var": float(last.activation_variance.iloc[-1]),
            "var_last_over_first": float(last.activation_variance.iloc[-1] / last.activation_variance.iloc[0]),
            "shared_direction_share": shared_direction_share(folder, windows)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="out/dyt_alpha0_probe")
    ap.add_argument("--out", default=str(C.ROOT / "reports" / NAME))
    ap.add_argument("--smoke", action="store_true", help="the campaign's smoke settings (a test of the script)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    setting, steps = (C.SMOKE, C.SMOKE["steps"]) if args.smoke else (C.FULL, STEPS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(DataConfig(max_tokens=setting["max_tokens"], val_windows=setting["val_windows"]), setting["seq_len"], 0)
    val = data[0].val[:16]  # held-out windows (B, T)
    rows = [probe_row(n, train_probe(n, Path(args.runs), setting, data, steps), val) for n in tqdm(PROBES, desc="probes")]
    table = pd.DataFrame(rows)
    stalled = table[(table.variant == "dyt") & (table.all_block_grads_zero_from_step != "")]
    dyt = table[table.variant == "dyt"]
    pre = table[table.variant == "pre"].iloc[0]
    verdict = (f"# DyT recipe probe: {len(stalled)}/{len(dyt)} DyT variants stalled (every block's gradient exactly 0) "
               f"within {steps} steps\n\n- Pre-LN final validation loss {pre.final_val_loss:.4g}; DyT variants "
               f"{dyt.final_val_loss.min():.4g}-{dyt.final_val_loss.max():.4g}\n"
               f"- last block's variance / first's at the last diagnostic step: Pre-LN {pre.var_last_over_first:.3g}, "
               f"DyT {dyt.var_last_over_first.min():.3g}-{dyt.var_last_over_first.max():.3g}\n"
               f"- share of the last block's output in one direction shared by every token: Pre-LN "
               f"{pre.shared_direction_share:.3g}, DyT {dyt.shared_direction_share.min():.3g}-"
               f"{dyt.shared_direction_share.max():.3g}\n")  # fmt: skip
    C.write_page(out, "DyT recipe probe: why DyT stalls at this scale", [
        ("Verdict", f'<div class="findings">{C.text_tag(verdict)}</div>'),
        ("Probes", C.table_tag(table)),
        ("How", C.text_tag(__doc__)),
    ])  # fmt: skip
    C.finish(out, NAME, argv, verdict, {"probes": table})


if __name__ == "__main__":
    main()
