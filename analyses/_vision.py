"""Shared by the vision analyses: the generated data sets, resumable CNN runs, and splits.

A run folder holds ``model.pt`` when finished; an unfinished one continues from its
``checkpoint.pt`` (``train_vision(..., resume=True)``), so a stopped campaign picks up where
it stopped. Nothing here is committed: the analyses write their tables under ``reports/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from depthprobe.facegen import ATTR_FILE, IMAGE_DIR, PARTITION_FILE, write_celeba, write_shapes
from depthprobe.images import ImageSet, load_images
from depthprobe.train.vision import (
    MODEL_FILE,
    VisionNet,
    VisionNetConfig,
    VisionTrainConfig,
    load_vision_net,
    train_vision,
    transfer_weights,
)

ROOT = Path(__file__).resolve().parent.parent
FACE_SEED, SHAPE_SEED = 1000, 2000  # the data sets' seeds (apart from the training seeds 0, 1, 2...)


def face_data(root: Path, num_images: int, size: int, image_size: int | None = None) -> dict[str, ImageSet]:
    """The generated faces (written once) split by ``list_eval_partition.txt``: train/val/test."""
    folder = root / f"faces-{num_images}-{size}"
    if not (folder / PARTITION_FILE).is_file():
        write_celeba(folder, num_images, seed=FACE_SEED, size=size)
    data = load_images(folder / IMAGE_DIR, folder / ATTR_FILE, image_size=image_size)
    part = [int(line.split()[1]) for line in (folder / PARTITION_FILE).read_text().splitlines() if line.strip()]
    part = torch.tensor(part)
    return {name: data.subset(torch.nonzero(part == k).flatten()) for k, name in enumerate(("train", "val", "test"))}


def shape_data(root: Path, num_images: int, size: int, image_size: int | None = None) -> dict[str, ImageSet]:
    """The generated shapes (class folders), the last 20% in file order held out."""
    folder = root / f"shapes-{num_images}-{size}"
    if not folder.is_dir():
        write_shapes(folder, num_images, seed=SHAPE_SEED, size=size)
    data = load_images(folder, image_size=image_size)
    cut = int(0.8 * len(data))
    return {"train": data.subset(range(cut)), "test": data.subset(range(cut, len(data)))}


def trained(run: Path, net_config: VisionNetConfig, data: ImageSet, train_config: VisionTrainConfig,
            init_from: Path | None = None) -> VisionNet:
    """The finished net of ``run``: loaded, or trained (resumed) from seed ``train_config.seed``."""
    if (run / MODEL_FILE).is_file():
        return load_vision_net(run / MODEL_FILE)
    torch.manual_seed(train_config.seed)
    net = VisionNet(net_config)
    if init_from is not None:
        transfer_weights(load_vision_net(init_from / MODEL_FILE), net)
    train_vision(net, data, train_config, out_dir=run, resume=True)
    return net


def script_args(name: str, doc: str, argv: list[str] | None, full: dict, smoke: dict):
    """``--runs``, ``--out``, ``--smoke``, ``--train-only``; the setting they pick. One thread:
    the runs are sized for one core, and two scripts may run side by side."""
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--runs", default=str(ROOT / "out" / name), help="run folders (checkpoints; not committed)")
    ap.add_argument("--out", default=str(ROOT / "reports" / name))
    ap.add_argument("--smoke", action="store_true", help="tiny settings, seconds")
    ap.add_argument("--train-only", action="store_true", help="train (or resume) the runs and stop")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    return args, (smoke if args.smoke else full)
