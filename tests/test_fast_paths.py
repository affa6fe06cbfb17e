"""Fast paths (issue 6) against their references: batched guidance of a step's K views.

The batched path renders and encodes the K views without a graph, gets the K targets from one
prior pass, then re-renders each view with a graph; its gradient must be the sequential one.
"""

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from mvsdi.config import preset
from mvsdi.distill import Distiller, Model
from mvsdi.field import Field, FieldConfig
from mvsdi.guidance import sdi_unet_calls
from mvsdi.priors.stable_diffusion import StableDiffusionPrior
from mvsdi.schedules import Schedules, ShadingSchedule
from mvsdi.testbed.prior import IdealDenoiserPrior
from mvsdi.variance import flat_gradient

CPU = torch.device("cpu")
SMALL_FIELD = FieldConfig(n_levels=4, log2_table_size=12, base_resolution=8, per_level_scale=2.0, hidden_dim=16)
# Shaded views from the first step, so normals (double backward) and shading draws are exercised.
SHADED = Schedules(shading=ShadingSchedule(ambient_only_until=0.0, shaded_prob=0.7))


@pytest.fixture(scope="module")
def priors(tiny_sd_folder):
    references = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return {"tiny": (StableDiffusionPrior(str(tiny_sd_folder), device="cpu"), "a wooden chair"),
            "ideal": (IdealDenoiserPrior.from_images({"chair": references}), "chair")}


def config_for(guidance: str, views: int, prompt: str, batching: str):
    name = f"mv{guidance}-k{views}"  # mvsds-k2, mvsdi-k4, ...
    return preset(name, prompt, model="tiny", device="cpu", resolution=16, samples_per_ray=8, budget=4 * views,
                  eval_views=2, eval_resolution=16, field=SMALL_FIELD, schedules=SHADED, view_batching=batching)


def one_step(config, prior):
    """Gradient, log record and (calls, images) of the prior for the first step of ``config``."""
    distiller = Distiller(config, prior, Model.create(config, CPU), CPU)
    calls, images = prior.counters.calls, prior.counters.images
    record = distiller.step()
    return flat_gradient(distiller.model), record, (prior.counters.calls - calls, prior.counters.images - images)


@pytest.mark.parametrize("views", [2, 4])
@pytest.mark.parametrize("guidance", ["sds", "sdi"])
@pytest.mark.parametrize("prior_name", ["tiny", "ideal"])
def test_batched_guidance_gives_the_sequential_gradient(priors, tiny_sd_prior64, float64, prior_name, guidance, views):
    """In float64, so that the float32 rounding of batched vs one-by-one kernels (which differs
    between CPUs and thread counts) cannot decide it; a real difference would be O(1)."""
    prior, prompt = (tiny_sd_prior64, priors["tiny"][1]) if prior_name == "tiny" else priors[prior_name]
    sequential = config_for(guidance, views, prompt, "sequential")
    batched = dataclasses.replace(sequential, view_batching="batched")
    assert not Distiller(sequential, prior, Model.create(sequential, CPU), CPU).batches_views()
    assert Distiller(batched, prior, Model.create(batched, CPU), CPU).batches_views()

    grad_seq, rec_seq, (calls_seq, images_seq) = one_step(sequential, prior)
    grad_bat, rec_bat, (calls_bat, images_bat) = one_step(batched, prior)

    assert rec_bat.t == rec_seq.t and rec_bat.shading == rec_seq.shading
    assert set(rec_seq.shading) != {"albedo"}  # the schedule really shaded some views
    assert grad_seq.abs().max() > 0
    # Only the prior's batch size differs (float64 rounding of batched kernels): 1e-8 of the largest entry.
    assert grad_seq.dtype == torch.float64
    scale = grad_seq.abs().max().item()
    assert (grad_bat - grad_seq).abs().max() <= 1e-8 * scale, (grad_bat - grad_seq).abs().max()
    assert rec_bat.loss == pytest.approx(rec_seq.loss, rel=1e-10)
    # Counting: the same images pass through the network; the K views' calls become one batch.
    assert images_bat == images_seq
    per_view = 1 if guidance == "sds" else sdi_unet_calls(rec_seq.t[0], sequential.guidance, 1000)
    assert (calls_seq, calls_bat) == (views * per_view, per_view)
    assert rec_bat.guidance_evaluations == rec_seq.guidance_evaluations == views


def test_the_gradient_check_catches_a_re_render_with_other_randomness(priors, monkeypatch):
    """Control: if the re-render drew fresh sample jitter, it would miss its target and the check fails."""
    prior, prompt = priors["tiny"]
    sequential = config_for("sds", 2, prompt, "sequential")
    grad_seq = one_step(sequential, prior)[0]
    monkeypatch.setattr(Distiller, "_copy_generator", staticmethod(lambda g: torch.Generator(g.device).manual_seed(1)))
    grad_bad = one_step(dataclasses.replace(sequential, view_batching="batched"), prior)[0]
    assert not torch.allclose(grad_bad, grad_seq, rtol=1e-4, atol=1e-4 * grad_seq.abs().max().item())


def test_view_batching_defaults_to_batched_on_cuda_only_and_rejects_unknown_modes(priors):
    prior, prompt = priors["tiny"]
    config = config_for("sdi", 2, prompt, "auto")
    assert config.view_batching == preset("sdi", "x").view_batching == "auto"
    assert not Distiller(config, prior, Model.create(config, CPU), CPU).batches_views()  # CPU: sequential
    single = dataclasses.replace(config_for("sdi", 2, prompt, "batched"), views=1, sampler="random", budget=4)
    assert not Distiller(single, prior, Model.create(single, CPU), CPU).batches_views()  # K=1: nothing to batch
    with pytest.raises(ValueError, match="view_batching must be one of auto, batched, sequential"):
        config_for("sdi", 2, prompt, "fast")


def test_the_fast_unet_is_opt_in_and_refuses_what_it_cannot_do(priors):
    prior, _ = priors["tiny"]
    assert prior.fast_unet == "off"
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    t, embeddings = torch.tensor([10, 500]), prior.embed_texts(["a", ""])
    expected = prior.unet(latents, t, encoder_hidden_states=embeddings).sample
    assert torch.equal(prior.predict_noise(latents, t, embeddings), expected)  # "off" is the plain UNet call
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        prior.use_fast_unet("cuda_graph")
    with pytest.raises(ValueError, match="must be one of off, compile, cuda_graph"):
        prior.use_fast_unet("max-autotune")
    assert prior.fast_unet == "off"


def test_a_compiled_field_keeps_autograd_training_normals_eager():
    """aot_autograd has no double backward: the reference "autograd" normals must not touch the
    compiled graph while training. (The default "analytic" normals need no double backward.)

    (The compiled forward itself is compared with eager by ``benchmarks/speed.py
    --check-compiled-field``: compiling takes ~30 s on this CPU, too slow for the unit suite.)
    """
    torch.manual_seed(0)
    reference = dataclasses.replace(SMALL_FIELD, normal_type="autograd")
    eager = Field(reference)
    fast = Field(dataclasses.replace(reference, compiled=True))
    fast.load_state_dict(eager.state_dict())
    fast._compiled_forward = lambda x: pytest.fail("compiled forward used under double backward")
    fast._compiled_gradient = lambda x: pytest.fail("compiled gradient used by autograd normals")
    x = torch.rand(64, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for field in (eager, fast):
        density, albedo, normals = field.with_normals(x)
        (density.sum() + albedo.sum() + normals.square().sum()).backward()  # second backward through ∇density
    assert torch.equal(fast.encoding.embeddings.grad, eager.encoding.embeddings.grad)
    assert eager.encoding.embeddings.grad.abs().max() > 0


def test_the_speed_benchmark_reports_batched_and_sequential_rows(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("speed", Path(__file__).parents[1] / "benchmarks" / "speed.py")
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    assert speed.main(["--model", "tiny", "--device", "cpu", "--guidance", "sds", "--views", "2",
                       "--resolutions", "16", "--samples-per-ray", "8", "--steps", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "speed.json").read_text())
    seq, bat = report["rows"]
    assert (seq["targets"], bat["targets"]) == ("sequential", "batched")
    assert (seq["unet_calls_per_evaluation"], bat["unet_calls_per_evaluation"]) == (1.0, 0.5)
    assert seq["unet_images_per_evaluation"] == bat["unet_images_per_evaluation"] == 2.0  # CFG: 2 per view
    for row in (seq, bat):
        parts = row["breakdown_ms_per_evaluation"]
        assert all(parts[name] > 0 for name in speed.PARTS) and row["peak_memory_gib"] is None
        assert row["projected_10k_minutes"] == pytest.approx(row["ms_per_evaluation"] * 10_000 / 60_000)
    assert "| sds | 2 | 16 | batched |" in capsys.readouterr().out
