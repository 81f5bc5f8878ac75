"""Procedural faces and shapes on cluttered backgrounds: pure functions of a seed.

Each image comes from its own generator ``numpy.random.default_rng([seed, index])``, so
image ``i`` is the same whatever the number of images made, and a seed gives the same bytes
on every run (Pillow's drawing and PNG encoder are deterministic). Drawing happens at twice
the size and is downsampled (anti-aliasing), then the face's box is scaled with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

#: binary attributes, with CelebA's names (``No_Beard`` keeps CelebA's polarity) and the
#: probability of +1; hair colour is one draw (black, blond or brown: neither flag)
ATTRIBUTES: dict[str, float] = {
    "Smiling": 0.5,
    "Mouth_Slightly_Open": 0.4,
    "Eyeglasses": 0.3,
    "No_Beard": 0.75,
    "Wearing_Hat": 0.25,
    "Black_Hair": 0.35,
    "Blond_Hair": 0.3,
    "Pale_Skin": 0.4,
    "Bangs": 0.3,
    "Narrow_Eyes": 0.3,
}

#: the general-shape classes of the pre-training task
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")

_SUPERSAMPLE = 2


@dataclass(frozen=True)
class Face:
    """One generated face: the image, its attributes (+1/-1 in :data:`ATTRIBUTES` order) and
    its box ``(x, y, width, height)`` in pixels of the final image."""

    image: Image.Image
    attributes: tuple[int, ...]
    box: tuple[int, int, int, int]


def _color(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, size=3))


def _clutter(rng: np.random.Generator, size: int, items: tuple[int, int] = (6, 13),
             largest: float = 0.5) -> Image.Image:
    """A background of random rectangles, ellipses and lines (the 'in the wild' part)."""
    image = Image.new("RGB", (size, size), _color(rng, 40, 220))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(*items))):
        x0, y0 = (int(v) for v in rng.integers(-size // 4, size, size=2))
        w, h = (int(v) for v in rng.integers(size // 10, max(size // 10 + 1, int(largest * size)), size=2))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=_color(rng))
        elif kind == 1:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=_color(rng))
        else:
            draw.line([x0, y0, x0 + w, y0 + h], fill=_color(rng), width=int(rng.integers(2, 3 + size // 32)))
    return image


_HAIR = {"Black_Hair": (25, 20, 18), "Blond_Hair": (225, 195, 110), "brown": (110, 70, 40)}


def _draw_face(draw: ImageDraw.ImageDraw, rng: np.random.Generator, a: dict[str, bool],
               cx: float, cy: float, w: float) -> None:
    """Head, hair, eyes, mouth and accessories of a face of width ``w`` centred at (cx, cy)."""
    h = 1.25 * w
    hair = _HAIR["Black_Hair" if a["Black_Hair"] else "Blond_Hair" if a["Blond_Hair"] else "brown"]
    skin = (238, 214, 196) if a["Pale_Skin"] else tuple(int(v) for v in rng.integers([150, 95, 60], [200, 140, 100]))
    draw.ellipse([cx - 0.58 * w, cy - 0.62 * h, cx + 0.58 * w, cy + 0.45 * h], fill=hair)  # hair behind the head
    draw.ellipse([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], fill=skin)
    if a["Bangs"]:
        draw.chord([cx - 0.5 * w, cy - 0.55 * h, cx + 0.5 * w, cy - 0.05 * h], 180, 360, fill=hair)
    if not a["No_Beard"]:
        draw.chord([cx - 0.45 * w, cy - 0.05 * h, cx + 0.45 * w, cy + 0.5 * h], 0, 180, fill=hair)
    ey, ex, er = cy - 0.08 * h, 0.2 * w, 0.08 * w
    for side in (-1, 1):
        squint = 0.35 if a["Narrow_Eyes"] else 1.0
        draw.ellipse([cx + side * ex - er, ey - er * squint, cx + side * ex + er, ey + er * squint], fill=(255, 255, 255))
        draw.ellipse([cx + side * ex - er / 2, ey - er * squint / 2, cx + side * ex + er / 2, ey + er * squint / 2],
                     fill=(30, 30, 60))
        if a["Eyeglasses"]:
            draw.ellipse([cx + side * ex - 1.9 * er, ey - 1.7 * er, cx + side * ex + 1.9 * er, ey + 1.7 * er],
                         outline=(10, 10, 10), width=max(2, int(0.05 * w)))
    if a["Eyeglasses"]:
        draw.line([cx - ex + 1.9 * er, ey, cx + ex - 1.9 * er, ey], fill=(10, 10, 10), width=max(2, int(0.04 * w)))
    my, mw = cy + 0.22 * h, 0.22 * w
    lips = (150, 40, 50)
    if a["Mouth_Slightly_Open"]:
        draw.ellipse([cx - mw * 0.7, my - 0.05 * h, cx + mw * 0.7, my + 0.07 * h], fill=(60, 10, 15), outline=lips)
    if a["Smiling"]:
        draw.arc([cx - mw, my - 0.12 * h, cx + mw, my + 0.08 * h], 20, 160, fill=lips, width=max(2, int(0.05 * w)))
    elif not a["Mouth_Slightly_Open"]:
        draw.line([cx - mw, my, cx + mw, my], fill=lips, width=max(2, int(0.04 * w)))
    if a["Wearing_Hat"]:
        brim = cy - 0.42 * h
        draw.rectangle([cx - 0.7 * w, brim - 0.06 * h, cx + 0.7 * w, brim], fill=(40, 60, 140))
        draw.rectangle([cx - 0.42 * w, brim - 0.4 * h, cx + 0.42 * w, brim], fill=(40, 60, 140))


def _sample_attributes(rng: np.random.Generator) -> dict[str, bool]:
    a = {name: bool(rng.random() < p) for name, p in ATTRIBUTES.items()}
    colour = rng.random()  # one hair colour: black, blond or brown
    a["Black_Hair"] = bool(colour < ATTRIBUTES["Black_Hair"])
    a["Blond_Hair"] = bool(ATTRIBUTES["Black_Hair"] <= colour < ATTRIBUTES["Black_Hair"] + ATTRIBUTES["Blond_Hair"])
    return a


def make_face(seed: int, index: int, size: int = 64) -> Face:
    """Face ``index`` of ``seed``: a random position and scale on clutter, with its box."""
    rng = np.random.default_rng([seed, index])
    big = size * _SUPERSAMPLE
    image = _clutter(rng, big)
    attributes = _sample_attributes(rng)
    w = float(rng.uniform(0.28, 0.5)) * big
    h = 1.25 * w
    margin_top = 0.95 * h if attributes["Wearing_Hat"] else 0.62 * h  # the hat rises above the head
    cx = float(rng.uniform(0.7 * w, big - 0.7 * w))
    cy = float(rng.uniform(margin_top, big - 0.5 * h))
    _draw_face(ImageDraw.Draw(image), rng, attributes, cx, cy, w)
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    s = 1 / _SUPERSAMPLE
    box = (round((cx - w / 2) * s), round((cy - h / 2) * s), round(w * s), round(h * s))
    return Face(image, tuple(1 if attributes[n] else -1 for n in ATTRIBUTES), box)


def make_shape(seed: int, index: int, size: int = 64) -> tuple[Image.Image, int]:
    """Shape image ``index`` of ``seed`` and its class (an index into :data:`SHAPES`)."""
    rng = np.random.default_rng([seed, index, 1])
    big = size * _SUPERSAMPLE
    image = _clutter(rng, big, items=(3, 7), largest=0.2)  # small clutter: the shape is the big object
    draw = ImageDraw.Draw(image)
    label = int(rng.integers(len(SHAPES)))
    r = float(rng.uniform(0.22, 0.4)) * big
    cx, cy = (float(v) for v in rng.uniform(r, big - r, size=2))
    colour, turn = _color(rng), float(rng.uniform(0, 2 * np.pi))
    name = SHAPES[label]
    if name in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=None if name == "ring" else colour, outline=(0, 0, 0),
                     width=max(3, int(0.3 * r)))
    else:
        corners = {"square": 4, "triangle": 3, "star": 10, "cross": 12}[name]
        radii = {"star": [r, 0.45 * r], "cross": [r, 0.42 * r, 0.42 * r]}.get(name, [r])
        if name == "cross":  # 12 corners of a plus sign: outer, inner, outer... at fixed angles
            angles = np.deg2rad([-20, 20, 45, 70, 110, 135, 160, 200, 225, 250, 290, 315]) + turn
            rad = [r if k % 3 != 2 else 0.42 * r for k in range(12)]
        else:
            angles = turn + np.arange(corners) * 2 * np.pi / corners
            rad = [radii[k % len(radii)] for k in range(corners)]
        draw.polygon([(cx + q * np.cos(t), cy + q * np.sin(t)) for q, t in zip(rad, angles, strict=True)], fill=colour,
                     outline=(0, 0, 0), width=max(2, int(0.06 * r)))  # a dark outline sets it off the clutter
    return image.resize((size, size), Image.Resampling.LANCZOS), label
