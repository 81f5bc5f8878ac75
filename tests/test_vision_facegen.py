"""The face generator: byte-identical per seed, CelebA's file layout, boxes inside the image."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from depthprobe.facegen import ATTRIBUTES, SHAPES, make_face, write_celeba, write_shapes


def _digest(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = (write_celeba(tmp_path / name, 12, seed=seed, size=32) for name, seed in (("a", 3), ("b", 3), ("c", 4)))
    assert _digest(a) == _digest(b)
    images = [k for k in _digest(a) if k.endswith(".png")]
    assert len(images) == 12
    assert all(_digest(a)[k] != _digest(c)[k] for k in images)
    # image i does not depend on how many were made
    d = write_celeba(tmp_path / "d", 5, seed=3, size=32)
    assert all(_digest(d)[k] == _digest(a)[k] for k in _digest(d) if k.endswith(".png"))


def test_celeba_layout_attributes_and_boxes(tmp_path):
    root = write_celeba(tmp_path / "faces", 20, seed=0, size=48)
    attr = (root / "list_attr_celeba.txt").read_text().splitlines()
    assert attr[0] == "20" and attr[1].split() == list(ATTRIBUTES)
    rows = [line.split() for line in attr[2:]]
    assert [r[0] for r in rows] == [f"{i:06d}.png" for i in range(1, 21)]
    values = np.array([[int(v) for v in r[1:]] for r in rows])
    assert set(np.unique(values)) <= {-1, 1}
    names = list(ATTRIBUTES)
    # hair colour is one draw: never both black and blond
    assert not ((values[:, names.index("Black_Hair")] == 1) & (values[:, names.index("Blond_Hair")] == 1)).any()
    for i, row in enumerate((root / "list_bbox_celeba.txt").read_text().splitlines()[2:]):
        name, x, y, w, h = row.split()
        face = make_face(0, i, 48)
        assert (int(x), int(y), int(w), int(h)) == face.box
        assert 0 <= int(x) and int(x) + int(w) <= 48 and int(y) + int(h) <= 48 + 1
        assert tuple(values[i]) == face.attributes
        with Image.open(root / "img_align_celeba" / name) as im:
            assert im.size == (48, 48)
    part = [line.split()[1] for line in (root / "list_eval_partition.txt").read_text().splitlines()]
    assert part.count("0") == 16 and part.count("1") == 2 and part.count("2") == 2


def test_shapes_in_class_folders(tmp_path):
    root = write_shapes(tmp_path / "shapes", 30, seed=1, size=32)
    found = {p.parent.name for p in root.rglob("*.png")}
    assert found <= set(SHAPES) and len(list(root.rglob("*.png"))) == 30
