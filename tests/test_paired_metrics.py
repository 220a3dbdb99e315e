"""research.paired_metrics: paired pixel error of sample sets drawn from the same noise (no features)."""

import json

import numpy as np
import pytest

from research import paired_metrics as pm


def test_paired_pixel_error_and_cli(tmp_path):
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (6, 1, 8, 8), dtype=np.uint8)
    other = ref.copy()
    other[:3] = 255 - other[:3]  # half the pairs changed, half identical
    for name, imgs in (("eval-ref", ref), ("eval-other", other)):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "images.npy", imgs)
    r = pm.paired_pixel(other, ref)
    d = (other.astype(np.float64) - ref) / 255.0
    assert r["pairs"] == 6 and r["mse"] == pytest.approx((d ** 2).mean(), abs=1e-6)
    assert pm.paired_pixel(ref, ref)["mse"] == 0.0
    out = tmp_path / "p.json"
    assert pm.main(["--ref", str(tmp_path / "eval-ref"), str(tmp_path / "eval-ref"), str(tmp_path / "eval-other"),
                    "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert list(res["rows"]) == ["eval-other"]  # the reference itself is skipped
    with pytest.raises(SystemExit, match="differ in shape"):
        pm.paired_pixel(ref[:2], ref)
