"""Veit et al. 2016 (Residual Networks Behave Like Ensembles of Relatively Shallow Networks):
deleting one residual block barely changes a ResNet's error, while deleting one layer of a
plain (VGG-like) net breaks it; downsampling blocks (projection shortcut) are the exception.

Per seed a residual CNN and the same CNN without shortcuts are trained on the generator's
shape task; then every block is lesioned (replaced by its shortcut: identity, or the 1x1
projection of a downsampling block; a plain block by identity where the shapes allow) with
``depthprobe``'s drop sweep, and the held-out error increase is compared over seeds.

    .venv/bin/python analyses/residual_lesion.py
    .venv/bin/python analyses/residual_lesion.py --smoke --runs /tmp/r --out /tmp/rl
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from analyses import _common as C  # noqa: E402
from analyses import _vision as V  # noqa: E402
from depthprobe.facegen import SHAPES  # noqa: E402
from depthprobe.train.vision import VisionNetConfig, VisionTrainConfig  # noqa: E402
from depthprobe.vision import analyze_images  # noqa: E402

NAME = "residual_lesion"
#: 3 stages of 3 blocks (2 downsampling) on 32 px shapes: ~10 minutes on one quiet core
FULL = dict(num_shapes=3000, size=64, image_size=32, seeds=3, channels=(8, 16, 32), blocks_per_stage=3,
            steps=300, batch_size=32)
SMOKE = dict(FULL, num_shapes=60, size=32, image_size=16, channels=(4, 8), blocks_per_stage=2, steps=6, batch_size=8)
ARMS = ("resnet", "plain")


def train_runs(runs: Path, s: dict) -> tuple[dict, dict]:
    """{(seed, arm): net} for the residual and the plain net, and the shape data."""
    shapes = V.shape_data(runs, s["num_shapes"], s["size"], image_size=s["image_size"])
    nets = {}
    for seed in range(s["seeds"]):
        for arm in ARMS:
            config = VisionNetConfig(num_outputs=len(SHAPES), channels=s["channels"],
                                     blocks_per_stage=s["blocks_per_stage"], residual=arm == "resnet")
            nets[seed, arm] = V.trained(runs / f"seed{seed}" / arm, config, shapes["train"],
                                        VisionTrainConfig(steps=s["steps"], batch_size=s["batch_size"], seed=seed))
            print(f"seed {seed} {arm}: trained", flush=True)
    return nets, shapes


def lesions(nets: dict, test) -> pd.DataFrame:
    """One row per (seed, arm, block): the held-out error increase when the block is lesioned."""
    frames = []
    for (seed, arm), net in sorted(nets.items()):
        result = analyze_images(net, test, metrics="drop", progress=False)
        frames.append(result.layers[["layer", "stage", "downsample", "drop_delta_error", "drop_delta_loss"]]
                      .assign(seed=seed, arm=arm, base_error=result.summary["base_error"]))
    return pd.concat(frames, ignore_index=True)


def per_seed(table: pd.DataFrame) -> pd.DataFrame:
    """Per seed: mean error increase of each arm's non-downsampling and downsampling blocks."""
    rows = []
    for seed, t in table.groupby("seed"):
        row = {"seed": seed}
        for arm in ARMS:
            a = t[t.arm == arm]
            row[f"{arm}_base_error"] = a.base_error.iloc[0]
            row[f"{arm}_plain_blocks"] = a[a.downsample == 0].drop_delta_error.mean()
            row[f"{arm}_downsampling_blocks"] = a[a.downsample == 1].drop_delta_error.mean()
        rows.append(row)
    return pd.DataFrame(rows)


def _figure(table: pd.DataFrame):
    fig, ax = plt.subplots(figsize=(7, 3.3))
    for arm, color in zip(ARMS, ("#1f5fa8", "#c0392b"), strict=True):
        mean = table[table.arm == arm].groupby("layer").drop_delta_error
        ax.plot(mean.mean().index, mean.mean().to_numpy(), marker="o", color=color, label=arm)
        ax.fill_between(mean.mean().index, mean.min().to_numpy(), mean.max().to_numpy(), color=color, alpha=0.15)
    down = sorted(table[(table.arm == "resnet") & (table.downsample == 1)].layer.unique())
    for layer in down:
        ax.axvline(layer, color="#888", ls=":", lw=1)
    ax.set_xlabel("lesioned block (dotted: downsampling)")
    ax.set_ylabel("held-out error increase")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def analyze_runs(nets: dict, shapes: dict, out: Path, s: dict, argv: list[str] | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = lesions(nets, shapes["test"])
    seeds = per_seed(table)
    v = seeds.__getitem__
    tests = C.test_parts([
        ("Plain nets break where ResNets do not", "plain - resnet error increase, non-downsampling blocks", 1,
         v("plain_plain_blocks").to_numpy(float), v("resnet_plain_blocks").to_numpy(float)),
        ("Downsampling blocks matter more", "resnet error increase, downsampling - other blocks", 1,
         v("resnet_downsampling_blocks").to_numpy(float), v("resnet_plain_blocks").to_numpy(float)),
    ])
    mean = seeds.mean()
    verdict = (f"# Veit et al. 2016, lesion study — {C.overall_verdict(tests)}\n\n"
               f"{len(seeds)} seeds; {len(shapes['train'])} training and {len(shapes['test'])} held-out shape images "
               f"({len(SHAPES)} classes, {s['image_size']} px). Base error: resnet {mean.resnet_base_error:.3f}, plain "
               f"{mean.plain_base_error:.3f}. Mean error increase from deleting one non-downsampling block: resnet "
               f"{mean.resnet_plain_blocks:+.3f}, plain {mean.plain_plain_blocks:+.3f}; one downsampling block of the "
               f"resnet (replaced by its projection shortcut): {mean.resnet_downsampling_blocks:+.3f}.\n\n"
               + C.parts_text(tests))
    C.write_page(out, "Residual lesion study (Veit et al. 2016) at CPU scale", [
        ("Verdict", C.text_tag(verdict)), ("Claims", C.table_tag(tests)), ("Per seed", C.table_tag(seeds)),
        ("Error increase per lesioned block (mean over seeds, band: min..max)", C.figure_tag(_figure(table), "lesions")),
        ("Every lesion", C.table_tag(table)),
    ])
    C.finish(out, NAME, argv, verdict, {"tests": tests, "per_seed": seeds, "lesions": table})


def main(argv: list[str] | None = None) -> None:
    args, setting = V.script_args(NAME, __doc__, argv, FULL, SMOKE)
    nets, shapes = train_runs(Path(args.runs), setting)
    if args.train_only:
        return
    analyze_runs(nets, shapes, Path(args.out), setting, argv)


if __name__ == "__main__":
    main()
