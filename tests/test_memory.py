"""The memory pre-flight: one training view's peak is estimated by a probe and checked before training."""

import os
import subprocess
import sys

import pytest
import torch

from mvsdi.config import preset
from mvsdi.distill import Distiller, Model
from mvsdi.field import FieldConfig
from mvsdi.memory import MemoryBudgetError, check_fits, estimate_view_memory, saved_tensor_bytes
from mvsdi.priors.stable_diffusion import StableDiffusionPrior

CPU = torch.device("cpu")
SMALL_FIELD = FieldConfig(n_levels=4, log2_table_size=12, base_resolution=8, per_level_scale=2.0, hidden_dim=16)


def distiller_at(prior, resolution, **kw):
    config = preset("sdi", "a chair", model="tiny", device="cpu", resolution=resolution, samples_per_ray=16,
                    eval_views=2, eval_resolution=16, field=SMALL_FIELD, budget=4, **kw)
    return Distiller(config, prior, Model.create(config, CPU), CPU)


def test_saved_bytes_count_each_storage_once():
    w = torch.ones(1000, requires_grad=True)  # 4,000 bytes, saved by both products below
    _, saved = saved_tensor_bytes(lambda: ((w * w) * w).sum())
    assert 8_000 <= saved <= 16_000  # w once, w*w once: not once per use


def test_the_render_estimate_grows_with_pixels_and_the_probe_moves_nothing(tiny_sd_folder):
    prior = StableDiffusionPrior(str(tiny_sd_folder), device="cpu")
    small, large = distiller_at(prior, 32), distiller_at(prior, 128)
    before = [p.detach().clone() for p in large.model.parameters()]
    a, b = estimate_view_memory(small), estimate_view_memory(large)
    assert a.render_bytes > 0 and a.prior_bytes > 0 and a.state_bytes > 0
    # the probe renders at min(resolution, 64): 32² exactly, 128² scaled from 64² by 4
    assert 8 * a.render_bytes < b.render_bytes < 24 * a.render_bytes
    assert b.prior_bytes == a.prior_bytes  # the prior resizes every render to its own input size
    assert all(torch.equal(x, y) for x, y in zip(before, large.model.parameters()))
    assert all(p.grad is None for p in large.model.parameters())


def test_a_run_that_does_not_fit_is_refused_with_the_knobs_and_a_resolution_that_fits(tiny_sd_folder):
    estimate = estimate_view_memory(distiller_at(StableDiffusionPrior(str(tiny_sd_folder), device="cpu"), 64))
    check_fits(estimate, estimate.peak_bytes + 1, 64, 16)  # fits: no error
    with pytest.raises(MemoryBudgetError, match=r"(?s)--resolution \d+ might fit.*--samples-per-ray.*K \(--views\)"):
        check_fits(estimate, estimate.peak_bytes // 2, 64, 16)


def test_generate_refuses_before_writing_anything(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mvsdi.cli", "generate", "a chair", "--model", "tiny", "--budget", "2", "--views", "1",
           "--preset", "sdi", "--resolution", "512", "--samples-per-ray", "64", "--device", "cpu", "--out", str(out),
           "--no-progress"]
    env = {**os.environ, "MVSDI_FREE_MEMORY_GIB": "0.5", "HF_HUB_OFFLINE": "1"}  # pretend 0.5 GiB is free
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "--resolution" in done.stderr and "--samples-per-ray" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists() and not any(tmp_path.iterdir())
