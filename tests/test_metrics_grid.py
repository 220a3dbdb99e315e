"""PNG sample grids and labelled FP32-vs-quantized comparisons: sizes, modes, placement, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pqcad_export.errors import PqcadError
from pqcad_export.metrics import make_grid, save_comparison, save_grid


def _imgs(n, c=1, hw=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, hw, hw), dtype=np.uint8)


def test_save_grid_gray_size_mode_and_placement(tmp_path):
    imgs = _imgs(5)
    p = save_grid(imgs, tmp_path / "sub" / "samples.png", nrow=3, padding=2)
    with Image.open(p) as im:
        assert im.format == "PNG" and im.mode == "L" and im.size == (3 * 18 + 2, 2 * 18 + 2)
        a = np.asarray(im)
    np.testing.assert_array_equal(a[20:36, 20:36], imgs[4, 0])  # image 4: row 1, column 1
    np.testing.assert_array_equal(a[2:18, 38:54], imgs[2, 0])   # image 2: row 0, column 2
    assert (a[20:36, 38:54] == 0).all()                          # empty sixth cell keeps pad_value
    assert [q.name for q in p.parent.iterdir()] == ["samples.png"]  # no temporary file left behind


def test_save_grid_rgb_and_scale(tmp_path):
    imgs = _imgs(4, c=3, hw=8, seed=1)
    p = save_grid(imgs, tmp_path / "rgb.png", nrow=8, padding=0, scale=2)
    with Image.open(p) as im:
        assert im.mode == "RGB" and im.size == (4 * 16, 16)
        a = np.asarray(im)
    np.testing.assert_array_equal(a[::2, 16:32:2], imgs[1].transpose(1, 2, 0))
    assert make_grid(imgs, nrow=2, padding=1).shape == (2 * 9 + 1, 2 * 9 + 1, 3)


def test_save_grid_errors(tmp_path):
    with pytest.raises(PqcadError, match="uint8"):
        save_grid(np.zeros((2, 1, 4, 4), np.float32), tmp_path / "a.png")
    with pytest.raises(PqcadError, match=r"\.png"):
        save_grid(_imgs(2), tmp_path / "a.jpg")
    with pytest.raises(PqcadError, match="nrow"):
        save_grid(_imgs(2), tmp_path / "a.png", nrow=0)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("layout", ["stacked", "side_by_side"])
def test_comparison_layout(tmp_path, layout):
    ref = np.zeros((4, 1, 16, 16), np.uint8)             # black reference, gray candidate: easy to locate
    cand = np.full((4, 1, 16, 16), 100, np.uint8)
    cand[2] = 50                                         # same noise index -> same column in both panels
    p = save_comparison(ref, cand, tmp_path / "compare.png", nrow=8, layout=layout)
    with Image.open(p) as im:
        assert im.mode == "L"
        a = np.asarray(im)
    panel_r, panel_c = make_grid(ref, 8, 2, 255)[..., 0], make_grid(cand, 8, 2, 255)[..., 0]
    ph, pw = panel_r.shape
    assert ph == 20 and pw == 4 * 18 + 2  # one row of images per model
    if layout == "stacked":
        assert a.shape[0] % 2 == 0 and a.shape[1] >= pw
        cell_h, cell_w = a.shape[0] // 2, a.shape[1]
        blocks = [(0, cell_h), (cell_h, 2 * cell_h)]
        origin = [(y1 - ph, 0) for _, y1 in blocks]
    else:
        assert a.shape[1] % 2 == 0
        cell_h, cell_w = a.shape[0], a.shape[1] // 2
        origin = [(cell_h - ph, 0), (cell_h - ph, cell_w)]
    band = cell_h - ph
    assert 8 <= band <= 40  # a small text label above each panel
    for (y, x), panel in zip(origin, (panel_r, panel_c)):
        np.testing.assert_array_equal(a[y:y + ph, x:x + pw], panel)
        label = a[y - band:y, x:x + cell_w]
        assert (label < 128).any() and (label == 255).mean() > 0.5  # dark text on a white band
    if layout == "stacked":  # column of image 2 lines up vertically
        x2 = 2 + 2 * 18
        assert (a[origin[0][0] + 2:origin[0][0] + 18, x2:x2 + 16] == 0).all()
        assert (a[origin[1][0] + 2:origin[1][0] + 18, x2:x2 + 16] == 50).all()


def test_comparison_mixed_channels_long_labels_and_errors(tmp_path):
    ref, cand = _imgs(2, c=1), _imgs(2, c=3, seed=4)
    long = "W4A8 50-step, TensorRT INT8 kernels (4-bit grid)"
    p = save_comparison(ref, cand, tmp_path / "c.png", labels=("FP32", long), nrow=2)
    with Image.open(p) as im:
        assert im.mode == "RGB" and im.width > 2 * 18 + 2  # the long label widened the panels
    with pytest.raises(PqcadError, match="same number and size"):
        save_comparison(_imgs(2), _imgs(3), tmp_path / "x.png")
    with pytest.raises(PqcadError, match="labels"):
        save_comparison(ref, ref, tmp_path / "x.png", labels="one")
    with pytest.raises(PqcadError, match="layout"):
        save_comparison(ref, ref, tmp_path / "x.png", layout="diagonal")
    assert sorted(q.name for q in tmp_path.iterdir()) == ["c.png"]
