"""PNG sample grids (report/samples.png) and labelled reference-vs-candidate comparisons, with PIL.

Images are uint8 NCHW (1 or 3 channels), e.g. sampling.to_uint8 output. In a comparison both sets must come
from the same initial noise in the same order, so column j of each panel is the same noise seed.
Files are written atomically (temporary file in the same folder, then os.replace).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..atomic import atomic_write
from ..errors import PqcadError
from .inception import ImagesLike, as_uint8_nchw

PathLike = Union[str, Path]


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise PqcadError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def make_grid(images_uint8: ImagesLike, nrow: int = 8, padding: int = 2, pad_value: int = 0,
              scale: int = 1) -> np.ndarray:
    """uint8 NCHW -> one HWC uint8 array (C = 1 or 3): `nrow` images per row, torchvision.make_grid layout.

    scale enlarges each image by an integer factor (nearest neighbour), handy for 32x32 samples.
    """
    imgs = as_uint8_nchw(images_uint8).numpy()
    nrow, padding = _check_int("nrow", nrow, 1), _check_int("padding", padding, 0)
    scale, pad_value = _check_int("scale", scale, 1), _check_int("pad_value", pad_value, 0)
    if pad_value > 255:
        raise PqcadError(f"pad_value must be in [0, 255], got {pad_value}")
    n, c, h, w = imgs.shape
    if scale > 1:
        imgs = imgs.repeat(scale, axis=2).repeat(scale, axis=3)
        h, w = h * scale, w * scale
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), pad_value, np.uint8)
    for i in range(n):
        y = padding + (i // cols) * (h + padding)
        x = padding + (i % cols) * (w + padding)
        grid[y:y + h, x:x + w] = imgs[i].transpose(1, 2, 0)
    return grid


def _to_pil(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr[..., 0], "L") if arr.shape[2] == 1 else Image.fromarray(arr, "RGB")


def _save_png_atomic(img: Image.Image, path: PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise PqcadError(f"sample grids are written as PNG: give a .png path, got {path}")
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
    return path


def save_grid(images_uint8: ImagesLike, path: PathLike, nrow: int = 8, padding: int = 2, pad_value: int = 0,
              scale: int = 1) -> Path:
    """Write a grid of uint8 NCHW images to a PNG (mode L for 1 channel, RGB for 3); returns the path."""
    return _save_png_atomic(_to_pil(make_grid(images_uint8, nrow, padding, pad_value, scale)), path)


def _font():
    try:
        return ImageFont.load_default(size=11)  # Pillow >= 10.1 (FreeType): a scalable font
    except TypeError:
        return ImageFont.load_default()


def save_comparison(reference: ImagesLike, candidate: ImagesLike, path: PathLike,
                    labels: Sequence[str] = ("FP32 100-step", "W4A8 50-step"), nrow: int = 8,
                    layout: str = "stacked", padding: int = 2, scale: int = 1) -> Path:
    """Two labelled panels of the same noise seeds: reference and candidate grids, image i at the same spot.

    layout="stacked": reference panel above the candidate panel (with nrow >= N: two rows, one per model);
    layout="side_by_side": panels left and right. Each panel has its label in a white band above it.
    1-channel images stay grayscale (PNG mode L) unless the other set is RGB.
    """
    ref, cand = as_uint8_nchw(reference, "reference images"), as_uint8_nchw(candidate, "candidate images")
    if ref.shape[0] != cand.shape[0] or ref.shape[2:] != cand.shape[2:]:
        raise PqcadError(f"comparison needs the same number and size of images (same noise): reference "
                         f"{tuple(ref.shape)} vs candidate {tuple(cand.shape)}")
    if isinstance(labels, str) or len(labels) != 2:
        raise PqcadError(f"labels must be two strings (reference, candidate), got {labels!r}")
    if layout not in ("stacked", "side_by_side"):
        raise PqcadError(f"layout must be 'stacked' or 'side_by_side', got {layout!r}")
    if ref.shape[1] != cand.shape[1]:  # one gray, one RGB: show both as RGB
        ref, cand = ref.expand(-1, 3, -1, -1), cand.expand(-1, 3, -1, -1)
    panels = [_to_pil(make_grid(x, nrow, padding, 255, scale)) for x in (ref, cand)]
    mode, pw, ph = panels[0].mode, panels[0].width, panels[0].height

    font = _font()
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    boxes = [probe.textbbox((0, 0), str(t), font=font) for t in labels]
    text_h = max(b[3] for b in boxes)
    band = text_h + 2 * max(padding, 2)
    width = max([pw] + [b[2] + 2 * max(padding, 2) for b in boxes])  # a long label widens its panel
    cell_w, cell_h = width, band + ph
    size = (cell_w, 2 * cell_h) if layout == "stacked" else (2 * cell_w, cell_h)
    white = 255 if mode == "L" else (255, 255, 255)
    canvas = Image.new(mode, size, white)
    draw = ImageDraw.Draw(canvas)
    for i, (panel, label) in enumerate(zip(panels, labels)):
        x0, y0 = (0, i * cell_h) if layout == "stacked" else (i * cell_w, 0)
        draw.text((x0 + max(padding, 2), y0 + max(padding, 2)), str(label), fill=0 if mode == "L" else (0, 0, 0),
                  font=font)
        canvas.paste(panel, (x0, y0 + band))
    return _save_png_atomic(canvas, path)
