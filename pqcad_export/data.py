"""Training / reference images: Fashion-MNIST (Debian `dataset-fashion-mnist` idx files) or a folder of images."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from .errors import PqcadError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def read_idx_images(path: str | Path) -> np.ndarray:
    """An idx3-ubyte(.gz) file as uint8 [N, H, W]."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise PqcadError(f"cannot read image file {path}: {exc}") from None
    if len(raw) < 16 or int.from_bytes(raw[0:4], "big") != 0x803:
        raise PqcadError(f"{path} is not an idx3-ubyte image file")
    n, h, w = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, h, w)


def fashion_mnist(split: str = "train", root: str | Path | None = None) -> np.ndarray:
    """Fashion-MNIST images, uint8 [N, 28, 28] (60,000 train / 10,000 test)."""
    root = Path(root) if root else FASHION_MNIST_DIR
    name = {"train": "train", "test": "t10k"}[split]
    f = root / f"{name}-images-idx3-ubyte.gz"
    if not f.is_file():
        raise PqcadError(f"Fashion-MNIST not found at {f} (apt-get install dataset-fashion-mnist, or pass a path)")
    return read_idx_images(f)


def image_folder(path: str | Path, size: int, channels: int = 1) -> np.ndarray:
    """Every image under a folder, resized to size x size, uint8 [N, H, W] (gray) or [N, H, W, 3] (RGB)."""
    from PIL import Image

    files = sorted(p for p in Path(path).rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise PqcadError(f"no images ({', '.join(IMAGE_EXTS)}) under {path}")
    mode = "L" if channels == 1 else "RGB"
    return np.stack([np.asarray(Image.open(f).convert(mode).resize((size, size), Image.BICUBIC)) for f in files])


def load_images(source: str | Path | None = None, size: int = 32, channels: int = 1) -> np.ndarray:
    """Images as uint8 NCHW at `size`: Fashion-MNIST (default / idx dir) zero-padded 28->32, or an image folder."""
    idx_file = source is not None and Path(source).is_file() and "idx3" in Path(source).name
    if source is None or idx_file or (Path(source).is_dir()
                                      and (Path(source) / "train-images-idx3-ubyte.gz").is_file()):
        imgs = read_idx_images(source) if idx_file else fashion_mnist("train", source)
        h = imgs.shape[1]
        pad = (size - h) // 2
        if pad < 0:
            raise PqcadError(f"cannot pad {h}x{h} idx images to {size}x{size}")
        imgs = np.pad(imgs, ((0, 0), (pad, size - h - pad), (pad, size - h - pad)))
        arr = imgs[:, None]
    elif Path(source).is_dir():
        arr = image_folder(source, size, channels)
        arr = arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)
    else:
        raise PqcadError(f"dataset not found: {source}")
    if arr.shape[1] != channels:
        arr = np.repeat(arr, channels, axis=1) if arr.shape[1] == 1 else arr.mean(1, keepdims=True).astype(np.uint8)
    return np.ascontiguousarray(arr)
