"""Image inputs for vision models: the built-in digits, a class-folder tree, or CelebA's layout.

``--images digits`` is scikit-learn's 1,797 labelled 8x8 digits (offline). ``--images FOLDER``
reads class subfolders (``FOLDER/cat/1.png``); with ``--attributes FILE`` (CelebA's
``list_attr_celeba.txt``: a count line, a line of attribute names, then ``name v1 v2 ...``
rows of +1/-1) the images are the rows' file names inside FOLDER, in the file's order, and
``list_bbox_celeba.txt`` beside it (if there) gives each face's box.

File order of a class-folder tree: by file name, then by class folder, so globally numbered
files (``00001.png`` ...) keep their order and per-class numbering interleaves the classes.
``--num-images N`` keeps the first N in that order. Pixels are scaled to [-1, 1]; images are
resized to ``--image-size`` P x P (bilinear) and their channels repeated (or averaged) to
the model's ``num_channels``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from depthprobe.errors import DepthprobeError

__all__ = ["IMAGE_SUFFIXES", "ImageSet", "load_images", "read_attribute_file"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BBOX_FILE = "list_bbox_celeba.txt"


@dataclass
class ImageSet:
    """Images ready for a model, with their labels.

    Attributes:
        pixels: ``(N, C, P, P)`` float32 in [-1, 1].
        labels: ``(N,)`` class indices, or None for attribute data.
        attributes: ``(N, A)`` float32 in {0, 1}, or None for class data.
        names: class names (``labels`` index them) or attribute names.
        boxes: ``(N, 4)`` ``x, y, width, height`` in pixels of ``pixels``, or None.
        source: where the images came from (for the summary).
    """

    pixels: torch.Tensor
    labels: torch.Tensor | None
    attributes: torch.Tensor | None
    names: list[str]
    source: str
    boxes: torch.Tensor | None = None
    files: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def multilabel(self) -> bool:
        return self.attributes is not None

    @property
    def targets(self) -> torch.Tensor:
        """What the objective compares the logits with: class indices or {0, 1} attributes."""
        return self.attributes if self.attributes is not None else self.labels

    def engine_batches(self, batch_size: int) -> list:
        """The engine's batches (:class:`depthprobe.probes.batch.Batch`): ``pixel_values`` in,
        class labels or attributes as targets."""
        from depthprobe.probes.batch import split_batches

        return split_batches({"pixel_values": self.pixels}, self.targets, batch_size)

    def subset(self, index) -> ImageSet:
        index = torch.as_tensor(index)
        def pick(t):
            return None if t is None else t[index]

        return ImageSet(self.pixels[index], pick(self.labels), pick(self.attributes), self.names, self.source,
                        pick(self.boxes), [self.files[i] for i in index.tolist()] if self.files else [])


def load_images(images: str | Path, attributes: str | Path | None = None, image_size: int | None = None,
                num_images: int | None = None, num_channels: int = 3) -> ImageSet:
    """Read ``--images`` (``digits`` or a folder) and ``--attributes`` into an :class:`ImageSet`.

    Raises :class:`DepthprobeError` (one line, what to do) for a missing or empty folder,
    an attribute file that does not match the images, and mixed sizes without ``image_size``.
    """
    if num_images is not None and num_images < 1:
        raise DepthprobeError(f"--num-images must be at least 1 (got {num_images})")
    if image_size is not None and image_size < 1:
        raise DepthprobeError(f"--image-size must be at least 1 (got {image_size})")
    if str(images) == "digits":
        if attributes is not None:
            raise DepthprobeError("--attributes needs --images FOLDER (the folder its rows name); the digits "
                                  "have class labels")
        return _digits(image_size, num_images, num_channels)
    folder = Path(images)
    if not folder.is_dir():
        raise DepthprobeError(f"--images {str(images)!r} is neither 'digits' nor a folder")
    if attributes is not None:
        files, attrs, names = read_attribute_file(attributes, folder, num_images)
        labels = None
    else:
        files, labels, names = _class_folder(folder, num_images)
        attrs = None
    pixels, scale = _read_pixels(files, image_size, num_channels, folder)
    boxes = _boxes(Path(attributes).parent / BBOX_FILE, files, scale) if attributes is not None else None
    return ImageSet(pixels, labels, attrs, names, str(folder), boxes, [f.name for f in files])


def _digits(image_size: int | None, num_images: int | None, num_channels: int) -> ImageSet:
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = min(num_images or len(digits.images), len(digits.images))
    x = torch.tensor(digits.images[:n] / 16.0, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    if image_size is not None and image_size != 8:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = _channels(x * 2 - 1, num_channels)
    return ImageSet(x, torch.tensor(digits.target[:n], dtype=torch.long), None, [str(c) for c in range(10)],
                    "digits (scikit-learn)")


def _class_folder(folder: Path, num_images: int | None) -> tuple[list[Path], torch.Tensor, list[str]]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = [(f.name, c, f) for c in classes for f in (folder / c).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        loose = [f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES]
        hint = (f"; its {len(loose)} images sit loose in the folder: put them in class subfolders "
                "(FOLDER/CLASS/image.png) or pass --attributes FILE") if loose else ""
        raise DepthprobeError(f"--images {str(folder)!r} has no images in class subfolders "
                              f"({', '.join(IMAGE_SUFFIXES[:3])}, ...){hint}")
    found.sort(key=lambda t: (t[0], t[1]))
    found = found[:num_images] if num_images else found
    used = sorted({c for _, c, _ in found})
    labels = torch.tensor([used.index(c) for _, c, _ in found], dtype=torch.long)
    return [f for _, _, f in found], labels, used


def read_attribute_file(path: str | Path, folder: Path, num_images: int | None = None):
    """CelebA ``list_attr_celeba.txt`` -> (image files, ``(N, A)`` {0, 1} attributes, names).

    The count line is optional; every row must have one +1/-1 (or 1/0) value per name, and
    every named image must be in ``folder``.
    """
    path = Path(path)
    if not path.is_file():
        raise DepthprobeError(f"--attributes {str(path)!r} is not a file")
    lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
    if lines and len(lines[0]) == 1 and lines[0][0].isdigit():
        lines = lines[1:]
    if len(lines) < 2:
        raise DepthprobeError(f"--attributes {path.name}: expected a line of attribute names, then one row per "
                              "image (CelebA's list_attr_celeba.txt format)")
    names, rows = lines[0], lines[1:num_images + 1 if num_images else None]
    values = []
    for k, row in enumerate(rows):
        if len(row) != len(names) + 1:
            raise DepthprobeError(f"--attributes {path.name}: row {k + 1} ({row[0]}) has {len(row) - 1} values for "
                                  f"{len(names)} attribute columns; each row is an image name and one +1/-1 per "
                                  "column")
        try:
            values.append([int(v) for v in row[1:]])
        except ValueError:
            raise DepthprobeError(f"--attributes {path.name}: row {k + 1} ({row[0]}) has a value that is not "
                                  "+1/-1") from None
    array = np.asarray(values)
    if not np.isin(array, (-1, 0, 1)).all():
        raise DepthprobeError(f"--attributes {path.name}: values must be +1/-1 (or 1/0)")
    files = [folder / row[0] for row in rows]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DepthprobeError(f"--attributes {path.name} names {len(missing)} image(s) not in {str(folder)!r} "
                              f"(first: {missing[0]}); pass the folder that holds them as --images")
    return files, torch.tensor(array > 0, dtype=torch.float32), names


def _read_pixels(files: list[Path], image_size: int | None, num_channels: int, folder: Path):
    """Stack the files as ``(N, C, P, P)`` in [-1, 1]; the factor boxes scale by."""
    images, sizes = [], set()
    for f in files:
        try:
            with Image.open(f) as im:
                images.append(im.convert("RGB") if num_channels != 1 else im.convert("L"))
        except OSError as exc:
            raise DepthprobeError(f"cannot read image {f}: {exc}") from None
        sizes.add(images[-1].size)
    if image_size is None and len(sizes) > 1:
        raise DepthprobeError(f"--images {str(folder)!r} mixes image sizes ({', '.join(f'{w}x{h}' for w, h in sorted(sizes)[:3])}"
                              f"{', ...' if len(sizes) > 3 else ''}); pass --image-size P to resize all to P x P")
    width = images[0].size[0]
    if image_size is not None:
        images = [im.resize((image_size, image_size), Image.Resampling.BILINEAR) for im in images]
    arrays = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    x = torch.from_numpy(arrays)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return _channels(x * 2 - 1, num_channels), (image_size / width if image_size else 1.0)


def _channels(x: torch.Tensor, num_channels: int) -> torch.Tensor:
    """Repeat one channel to ``num_channels``, or average RGB to one."""
    if x.shape[1] == num_channels:
        return x.contiguous()
    if x.shape[1] == 1:
        return x.repeat(1, num_channels, 1, 1)
    return x.mean(1, keepdim=True).repeat(1, num_channels, 1, 1)


def _boxes(path: Path, files: list[Path], scale: float) -> torch.Tensor | None:
    """Boxes of ``files`` from CelebA's ``list_bbox_celeba.txt`` (None when absent or partial)."""
    if not path.is_file():
        return None
    table = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 5 and not parts[0].startswith("image_id"):
            try:
                table[parts[0]] = [float(v) * scale for v in parts[1:]]
            except ValueError:
                continue
    if not all(f.name in table for f in files):
        return None
    return torch.tensor([table[f.name] for f in files], dtype=torch.float32)
