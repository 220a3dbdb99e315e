"""The real Fashion-MNIST files (Debian dataset-fashion-mnist, installed by .ci/run) and the built-in teacher."""

import numpy as np
import pytest
import torch

from pqcad_export.data import FASHION_MNIST_DIR, fashion_mnist, load_images
from pqcad_export.errors import PqcadError
from pqcad_export.model_io import DEFAULT_MODEL_DIR, load_model
from pqcad_export.sampling import SamplerConfig, TorchUNet, ddim_sample


def test_fashion_mnist_reader_real_files():
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail("Fashion-MNIST missing: apt-get install dataset-fashion-mnist (tools/setup_env.sh does it)")
    train = fashion_mnist("train")
    assert train.shape == (60000, 28, 28) and train.dtype == np.uint8
    assert fashion_mnist("test").shape == (10000, 28, 28)
    assert 0 < train.mean() < 255 and train.max() == 255
    padded = load_images(None, size=32)
    assert padded.shape == (60000, 1, 32, 32)
    assert (padded[:, :, :2] == 0).all() and np.array_equal(padded[:, 0, 2:30, 2:30], train)


def test_reader_errors(tmp_path):
    with pytest.raises(PqcadError, match="Fashion-MNIST not found"):
        fashion_mnist("train", tmp_path)
    bad = tmp_path / "x-images-idx3-ubyte"
    bad.write_bytes(b"not an idx file at all")
    with pytest.raises(PqcadError, match="not an idx3-ubyte"):
        load_images(bad)


def test_builtin_teacher_loads_and_samples():
    m = load_model()
    assert m.path == DEFAULT_MODEL_DIR and m.class_name == "UNet2DModel" and m.sample_shape == (1, 32, 32)
    n_params = sum(p.numel() for p in m.unet.parameters())
    assert n_params == 2_244_609
    assert (DEFAULT_MODEL_DIR / "diffusion_pytorch_model.safetensors").stat().st_size <= 12 * 1024 * 1024
    imgs = ddim_sample(TorchUNet(m.unet), m.scheduler_config, m.sample_shape, 2, SamplerConfig(steps=5, seed=0))
    assert imgs.shape == (2, 1, 32, 32) and torch.isfinite(imgs).all()
    # a trained model: images use the range and have a dark background like Fashion-MNIST
    assert imgs.std() > 0.2 and imgs[:, :, :2].mean() < -0.5


def test_idx_file_path_is_padded_like_the_default(tmp_path):
    """A path to an idx3 file (e.g. copied to a GPU machine) gives the same padded 32x32 images as the default."""
    import gzip

    raw = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28).astype(np.uint8)
    f = tmp_path / "train-images-idx3-ubyte.gz"
    header = np.array([2051, 3, 28, 28], dtype=">u4").tobytes()
    f.write_bytes(gzip.compress(header + raw.tobytes()))
    from_file, from_dir = load_images(f, size=32), load_images(tmp_path, size=32)
    assert from_file.shape == (3, 1, 32, 32) and np.array_equal(from_file, from_dir)
    assert np.array_equal(from_file[:, 0, 2:30, 2:30], raw) and from_file[:, :, :2].max() == 0
