"""Seeded tiny diffusers UNets in diffusers layout, shared by every test (CPU, fast)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from pqcad_export.model_io import DEFAULT_SCHEDULER_CONFIG


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One intra-op thread: tiny kernels gain nothing from two, and on a shared 2-core machine two threads per
    process made them up to 100x slower (measured while several suites ran at once)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Test modules that share a session fixture run on one pytest-xdist worker (tools/test.sh: -n N --dist loadfile),
# so the fixture is built once: module -> the module whose worker it joins.
SAME_WORKER = {"tests/test_gate_report.py": "tests/test_pipeline.py"}  # both read tiny_build

try:
    from xdist.scheduler import LoadFileScheduling
except ImportError:  # no xdist: one process, nothing to schedule
    LoadFileScheduling = None

if LoadFileScheduling is not None:
    class _SharedFixtureScheduling(LoadFileScheduling):
        """--dist loadfile, with SAME_WORKER's modules in one work unit."""

        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return SAME_WORKER.get(scope, scope)

    def pytest_xdist_make_scheduler(config, log):
        if config.getvalue("dist") == "loadfile":
            return _SharedFixtureScheduling(config, log)
        return None


def _save(unet, path):
    unet.save_pretrained(str(path), safe_serialization=True)
    (path / "scheduler_config.json").write_text(json.dumps(DEFAULT_SCHEDULER_CONFIG))
    return path


def make_tiny_unet(attention: bool = False, seed: int = 0, norm_num_groups: int = 8) -> UNet2DModel:
    torch.manual_seed(seed)
    down = ("DownBlock2D", "AttnDownBlock2D") if attention else ("DownBlock2D", "DownBlock2D")
    up = ("AttnUpBlock2D", "UpBlock2D") if attention else ("UpBlock2D", "UpBlock2D")
    return UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=down, up_block_types=up,
                       norm_num_groups=norm_num_groups, attention_head_dim=8).eval()


def make_tiny_cond_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1,
                                block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=16,
                                attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


# Tiny everything: 10 teacher steps -> 5 student steps, a few iterations per stage, short latency loops.
TINY = {
    "calib": {"n_per_step": 4, "every_k": 2, "batch_size": 4, "dc_trajectories": 2, "shard_size": 8},
    "quant": {"iters": 6, "act_iters": 2, "batch_size": 4, "max_calib": 16, "capture_batch_size": 8},
    "student": {"iters": 4, "batch_size": 2, "n_train_images": 4, "eval_images": 2, "eval_steps": 2,
                "gap_samples": 2, "checkpoint_every": 2, "cdc_batch": 2, "log_every": 2},
    "compare": {"warmup": 1, "latency_iters": 3, "image_runs": 2},
}


def tiny_cfg(model_dir, out, **kw):
    """A BuildConfig of the tiny budgets above (ONNX Runtime engine, 4 compare samples)."""
    from pqcad_export.pipeline.build import BuildConfig

    base = dict(bits="w4a8", model=str(model_dir), out=str(out), teacher_steps=10, student_steps=5,
                backend="onnxruntime", samples=4, compare_batch=2, quiet=True, overrides=TINY)
    base.update(kw)
    return BuildConfig.flat(**base)


@pytest.fixture(scope="session")
def tiny_unet_dir(tmp_path_factory):
    return _save(make_tiny_unet(attention=False), tmp_path_factory.mktemp("tiny_unet"))


@pytest.fixture(scope="session")
def tiny_attn_unet_dir(tmp_path_factory):
    return _save(make_tiny_unet(attention=True), tmp_path_factory.mktemp("tiny_attn_unet"))


@pytest.fixture(scope="session")
def tiny_cond_unet_dir(tmp_path_factory):
    return _save(make_tiny_cond_unet(), tmp_path_factory.mktemp("tiny_cond_unet"))


@pytest.fixture(scope="session")
def tiny_build(tiny_attn_unet_dir, tmp_path_factory):
    """One finished tiny w4a8 build of the attention UNet (every stage, FID on), built once per session (per
    pytest-xdist worker) and shared: tests that only read a run use it as it is; a test that changes a run works
    on a copy (shutil.copytree)."""
    from pqcad_export.pipeline.build import run_build

    out = tmp_path_factory.mktemp("tiny_build") / "w4a8"
    return out, run_build(tiny_cfg(tiny_attn_unet_dir, out))
