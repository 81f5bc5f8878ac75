"""An offline face-attributes test bed in CelebA's file layout (the real CelebA drops in).

``write_celeba(root, n, seed)`` writes::

    root/img_align_celeba/000001.png ...
    root/list_attr_celeba.txt        # count, attribute names, then "name  1 -1 ..." rows
    root/list_bbox_celeba.txt        # count, "image_id x_1 y_1 width height", then rows
    root/list_eval_partition.txt     # "name 0|1|2" (train / val / test)

``write_shapes(root, n, seed)`` writes the general-shape classification task as class
subfolders (``root/circle/00001.png``), the layout ``--images FOLDER`` reads.

Example:
    >>> from depthprobe.facegen import write_celeba
    >>> write_celeba("data/faces", 2000, seed=0)    # doctest: +SKIP
    $ depthprobe analyze ./facenet --images data/faces/img_align_celeba \\
        --attributes data/faces/list_attr_celeba.txt --metrics angular,probe
"""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from depthprobe.facegen.draw import ATTRIBUTES, SHAPES, Face, make_face, make_shape

__all__ = ["ATTRIBUTES", "ATTR_FILE", "BBOX_FILE", "IMAGE_DIR", "PARTITION_FILE", "SHAPES", "Face", "make_face", "make_shape", "write_celeba", "write_shapes"]

IMAGE_DIR = "img_align_celeba"
ATTR_FILE, BBOX_FILE, PARTITION_FILE = "list_attr_celeba.txt", "list_bbox_celeba.txt", "list_eval_partition.txt"


def write_celeba(root: str | Path, num_images: int, seed: int = 0, size: int = 64, progress: bool = False) -> Path:
    """Write ``num_images`` faces of ``seed`` in CelebA's layout under ``root``; returns ``root``.

    The split follows CelebA's proportions (80% train, 10% val, 10% test) in file order.
    """
    root = Path(root)
    (root / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    attr_rows, box_rows, part_rows = [], [], []
    for i in tqdm(range(num_images), desc="faces", disable=not progress):
        face = make_face(seed, i, size)
        name = f"{i + 1:06d}.png"
        face.image.save(root / IMAGE_DIR / name, optimize=False)
        attr_rows.append(name + "".join(f" {v:2d}" for v in face.attributes))
        box_rows.append(f"{name} " + " ".join(map(str, face.box)))
        part_rows.append(f"{name} {0 if i < 0.8 * num_images else 1 if i < 0.9 * num_images else 2}")
    (root / ATTR_FILE).write_text(f"{num_images}\n{' '.join(ATTRIBUTES)}\n" + "\n".join(attr_rows) + "\n")
    (root / BBOX_FILE).write_text(f"{num_images}\nimage_id x_1 y_1 width height\n" + "\n".join(box_rows) + "\n")
    (root / PARTITION_FILE).write_text("\n".join(part_rows) + "\n")
    return root


def write_shapes(root: str | Path, num_images: int, seed: int = 0, size: int = 64) -> Path:
    """Write ``num_images`` shape images of ``seed`` into class subfolders of ``root``."""
    root = Path(root)
    for name in SHAPES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        image, label = make_shape(seed, i, size)
        image.save(root / SHAPES[label] / f"{i + 1:05d}.png", optimize=False)
    return root
