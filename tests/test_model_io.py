import json

import pytest
import torch

from pqcad_export.bits import parse_bits
from pqcad_export.errors import PqcadError, UsageError
from pqcad_export.model_io import load_model
from pqcad_export.sampling import SamplerConfig, TorchUNet, ddim_sample, ddim_timesteps


@pytest.mark.parametrize("text,w,a", [("w8a8", 8, 8), ("W4A8", 4, 8), ("w4a16", 4, 16), ("w8a16", 8, 16)])
def test_parse_bits(text, w, a):
    b = parse_bits(text)
    assert (b.weight_bits, b.act_bits) == (w, a)


@pytest.mark.parametrize("text", ["w3x8", "w3a8", "a8w8", "", "w16a16"])
def test_parse_bits_rejects(text):
    with pytest.raises(UsageError, match="unsupported --bits"):
        parse_bits(text)


def test_load_errors(tmp_path):
    with pytest.raises(PqcadError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(PqcadError, match="not a diffusers UNet directory"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(PqcadError, match="not a diffusers UNet"):
        load_model(tmp_path)


def test_load_and_fingerprint(tiny_unet_dir, tiny_cond_unet_dir):
    m = load_model(tiny_unet_dir)
    assert m.class_name == "UNet2DModel" and m.sample_shape == (1, 16, 16)
    assert m.fingerprint == load_model(tiny_unet_dir).fingerprint
    c = load_model(tiny_cond_unet_dir)
    assert c.is_conditional and c.fingerprint != m.fingerprint


def test_sampler_deterministic(tiny_unet_dir):
    m = load_model(tiny_unet_dir)
    cfg = SamplerConfig(steps=5, eta=0.5, batch_size=3, seed=7)
    a = ddim_sample(TorchUNet(m.unet), m.scheduler_config, m.sample_shape, 4, cfg)
    b = ddim_sample(TorchUNet(m.unet), m.scheduler_config, m.sample_shape, 4, cfg)
    assert a.shape == (4, 1, 16, 16) and torch.equal(a, b)
    c = ddim_sample(TorchUNet(m.unet), m.scheduler_config, m.sample_shape, 4, SamplerConfig(5, 0.5, 3, seed=8))
    assert not torch.equal(a, c)


def test_conditional_sampler(tiny_cond_unet_dir):
    m = load_model(tiny_cond_unet_dir)
    cond = torch.randn(2, 3, 16)
    out = ddim_sample(TorchUNet(m.unet), m.scheduler_config, m.sample_shape, 2, SamplerConfig(3, 0.0, 2, 0),
                      cond=cond)
    assert out.shape == (2, 2, 8, 8) and torch.isfinite(out).all()


def test_student_grid_is_every_other_teacher_step(tiny_unet_dir):
    m = load_model(tiny_unet_dir)
    teacher, student = ddim_timesteps(m.scheduler_config, 100), ddim_timesteps(m.scheduler_config, 50)
    assert torch.equal(teacher[0::2], student)
