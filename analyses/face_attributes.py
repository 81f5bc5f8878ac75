"""Liu et al. 2015 (Deep Learning Face Attributes in the Wild) at CPU scale, on generated faces.

Per seed: a CNN pre-trained on the generator's general-shape task then trained on the face
attributes, and the same CNN trained from scratch (same initial weights, same batch order).
The paper's three claims, tested over seeds:

1. pre-training matters: pre-trained vs scratch held-out mean attribute accuracy;
2. response maps of a net trained only with image-level attribute tags locate faces: the
   class-activation-map peak inside the true box (pointing accuracy) and the IoU of the
   thresholded map, against a centre and a random baseline;
3. high-level units explain attributes sparsely: the units an L1 probe needs for 95% of the
   dense probe's AUC, last block vs first block.

    .venv/bin/python analyses/face_attributes.py            # trains (resumable), then writes reports/face_attributes
    .venv/bin/python analyses/face_attributes.py --smoke --runs /tmp/r --out /tmp/fa
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from analyses import _common as C  # noqa: E402
from analyses import _vision as V  # noqa: E402
from depthprobe.facegen import ATTRIBUTES, SHAPES  # noqa: E402
from depthprobe.model.vision import VisionStack  # noqa: E402
from depthprobe.probes.response_maps import baseline_scores, response_maps  # noqa: E402
from depthprobe.report import write_report  # noqa: E402
from depthprobe.train.vision import VisionNetConfig, VisionTrainConfig, evaluate_vision  # noqa: E402
from depthprobe.vision import analyze_images  # noqa: E402

NAME = "face_attributes"
#: sized for ~20 minutes on one core: 64 px faces, a stride-2 stem, 3 stages of 2 blocks
FULL = dict(num_faces=3000, num_shapes=3000, size=64, seeds=3, channels=(16, 32, 64), blocks_per_stage=2,
            stem_stride=2, pretrain_steps=400, face_steps=400, batch_size=32)
SMOKE = dict(FULL, num_faces=60, num_shapes=60, size=32, channels=(4, 8), blocks_per_stage=1, pretrain_steps=4,
             face_steps=6, batch_size=8)


def train_runs(runs: Path, s: dict) -> dict[tuple[int, str], torch.nn.Module]:
    """Per seed: shapes pre-training, then faces from it and from scratch; {(seed, arm): net}."""
    faces, shapes = V.face_data(runs, s["num_faces"], s["size"]), V.shape_data(runs, s["num_shapes"], s["size"])
    base = dict(channels=s["channels"], blocks_per_stage=s["blocks_per_stage"], stem_stride=s["stem_stride"])
    nets = {}
    for seed in range(s["seeds"]):
        steps = dict(batch_size=s["batch_size"], seed=seed, ckpt_every=100)
        pre = runs / f"seed{seed}" / "shapes_pretrain"
        V.trained(pre, VisionNetConfig(num_outputs=len(SHAPES), **base), shapes["train"],
                  VisionTrainConfig(steps=s["pretrain_steps"], **steps))
        face_config = VisionNetConfig(num_outputs=len(ATTRIBUTES), multilabel=True, **base)
        for arm, init in (("scratch", None), ("pretrained", pre)):
            nets[seed, arm] = V.trained(runs / f"seed{seed}" / f"face_{arm}", face_config, faces["train"],
                                        VisionTrainConfig(steps=s["face_steps"], **steps), init_from=init)
            print(f"seed {seed} {arm}: trained", flush=True)
    return nets


def measure_runs(nets: dict, test, train) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per (seed, arm): held-out accuracy, localization and probes; per-layer rows too."""
    majority = float(((train.attributes.mean(0) > 0.5).float() == test.attributes).float().mean())
    rows, layer_rows = [], []
    for (seed, arm), net in sorted(nets.items()):
        result = analyze_images(net, test, metrics="probe,response", progress=False)
        layers = result.layers.assign(seed=seed, arm=arm)
        layers["units_fraction"] = layers.sparse_probe_units / _widths(net)
        layer_rows.append(layers)
        base = baseline_scores(test.boxes, test.pixels.shape[-1], seed=seed)
        last, first = layers.iloc[-1], layers.iloc[0]
        rows.append({"seed": seed, "arm": arm, **evaluate_vision(net, test), "majority_accuracy": majority,
                     "pointing": last.pointing_accuracy, "iou": last.response_iou,
                     "pointing_centre": base["centre"]["pointing_accuracy"], "iou_centre": base["centre"]["response_iou"],
                     "pointing_random": base["random"]["pointing_accuracy"], "iou_random": base["random"]["response_iou"],
                     "probe_auc_first": first.probe_auc, "probe_auc_last": last.probe_auc,
                     "units_fraction_first": first.units_fraction, "units_fraction_last": last.units_fraction,
                     "units_last": last.sparse_probe_units})
    return pd.DataFrame(rows), pd.concat(layer_rows, ignore_index=True)


def _widths(net) -> np.ndarray:
    """Channels of each block's output (the units a probe can use)."""
    return np.array([b.branch[-1].num_features for b in net.blocks], float)


def claim_tests(runs: pd.DataFrame) -> pd.DataFrame:
    """The three claims as paired tests over seeds (pre-trained arm for claims 2 and 3)."""
    pre, scratch = (runs[runs.arm == a].sort_values("seed") for a in ("pretrained", "scratch"))
    v = lambda frame, col: frame[col].to_numpy(float)  # noqa: E731
    return C.test_parts([
        ("Pre-training raises attribute accuracy", "pretrained - scratch mean attribute accuracy", 1,
         v(pre, "accuracy"), v(scratch, "accuracy")),
        ("Response maps locate faces better than the centre", "pointing accuracy - centre baseline", 1,
         v(pre, "pointing"), v(pre, "pointing_centre")),
        ("Response maps locate faces better than chance", "pointing accuracy - random baseline", 1,
         v(pre, "pointing"), v(pre, "pointing_random")),
        ("Deep units explain attributes better", "probe AUC last - first block", 1,
         v(pre, "probe_auc_last"), v(pre, "probe_auc_first")),
        ("Deep units explain attributes sparsely", "share of units for 95% AUC, last - first block", -1,
         v(pre, "units_fraction_last"), v(pre, "units_fraction_first")),
    ])


def _overlay_figure(net, test, count: int = 6):
    """A few held-out faces with the last block's response map and the true box."""
    stack = VisionStack.from_model(net)
    sub = test.subset(range(count))
    maps = response_maps(stack, sub, [len(stack) - 1])[len(stack) - 1]
    up = torch.nn.functional.interpolate(maps[:, None], size=test.pixels.shape[-2:], mode="bilinear")[:, 0]
    fig, axes = plt.subplots(1, count, figsize=(2 * count, 2.2))
    for ax, img, m, box in zip(axes, sub.pixels, up, sub.boxes, strict=True):
        ax.imshow(((img.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
        ax.imshow(m.numpy(), alpha=0.45, cmap="jet")
        x, y, w, h = box.tolist()
        ax.add_patch(plt.Rectangle((x, y), w, h, fill=False, color="white", lw=1.5))
        ax.axis("off")
    fig.tight_layout()
    return fig


def analyze_runs(nets: dict, runs_dir: Path, out: Path, s: dict, argv: list[str] | None) -> None:
    faces = V.face_data(runs_dir, s["num_faces"], s["size"])
    out.mkdir(parents=True, exist_ok=True)
    runs, layers = measure_runs(nets, faces["test"], faces["train"])
    tests = claim_tests(runs)
    pre = runs[runs.arm == "pretrained"]
    mean = runs.groupby("arm")[["accuracy", "majority_accuracy", "pointing", "iou"]].mean()
    verdict = (f"# Liu et al. 2015, face attributes in the wild — {C.overall_verdict(tests)}\n\n"
               f"{len(pre)} seeds, {len(faces['train'])} generated training faces of {s['size']} px, "
               f"{len(faces['test'])} held out. Mean attribute accuracy: pre-trained "
               f"{mean.loc['pretrained', 'accuracy']:.3f}, scratch {mean.loc['scratch', 'accuracy']:.3f}, "
               f"majority baseline {mean.loc['scratch', 'majority_accuracy']:.3f}. Pointing accuracy of the last "
               f"block's response map {pre.pointing.mean():.3f} vs centre {pre.pointing_centre.mean():.3f} and random "
               f"{pre.pointing_random.mean():.3f}; IoU {pre.iou.mean():.3f} vs centre {pre.iou_centre.mean():.3f}.\n\n"
               + C.parts_text(tests))
    # one full depthprobe report of the first pre-trained net (the README screenshot)
    first = nets[0, "pretrained"]
    result = analyze_images(first, faces["test"], metrics="angular,variance,grad,drop,lens,probe,response",
                            model_name="face CNN (pre-trained on shapes), seed 0", progress=False)
    result.save(out / "analyze_seed0")
    write_report([result], out / "analyze_seed0" / "report.html")
    C.write_page(out, "Face attributes (Liu et al. 2015) at CPU scale", [
        ("Verdict", C.text_tag(verdict)),
        ("Claims", C.table_tag(tests)),
        ("Runs", C.table_tag(runs)),
        ("Per-layer probes and localization (mean over seeds)",
         C.figure_tag(C.plot_profiles(layers.rename(columns={"arm": "variant"}),
                                      ["probe_auc", "units_fraction", "pointing_accuracy"], ["pretrained", "scratch"]),
                      "per-layer probes")),
        ("Response maps of held-out faces (last block, pre-trained seed 0; box: ground truth)",
         C.figure_tag(_overlay_figure(first, faces["test"]), "response maps")),
    ])
    C.finish(out, NAME, argv, verdict, {"tests": tests, "runs": runs, "layers": layers})


def main(argv: list[str] | None = None) -> None:
    args, setting = V.script_args(NAME, __doc__, argv, FULL, SMOKE)
    nets = train_runs(Path(args.runs), setting)
    if args.train_only:
        return
    analyze_runs(nets, Path(args.runs), Path(args.out), setting, argv)


if __name__ == "__main__":
    main()
