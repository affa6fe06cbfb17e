"""The ideal denoiser: exact on hand-computable sets, CFG behaviour, protocol use, the reference cache."""

import math
import warnings

import pytest
import torch

from mvsdi.cameras import evaluation_cameras
from mvsdi.guidance import SDIConfig, SDSConfig, guidance_target
from mvsdi.models import load_prior
from mvsdi.priors import DiffusionPrior, PromptConditioning, PromptConfig
from mvsdi.testbed import SCENES, IdealDenoiserPrior
from mvsdi.testbed import prior as prior_module
from mvsdi.testbed import scenes as scenes_module

PLAIN = PromptConfig(view_dependent=False, perp_neg=False)


def images(n, size=8, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def two_sets():
    return IdealDenoiserPrior.from_images({"alpha": images(3, seed=1), "beta": images(2, seed=2)})


@pytest.fixture
def count_renders(monkeypatch):
    calls = []
    real = scenes_module.render_truth

    def counting(*args, **kwargs):
        calls.append(args[0].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(scenes_module, "render_truth", counting)
    return calls


def test_schedule_is_sd21():
    from diffusers import DDIMScheduler

    reference = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              num_train_timesteps=1000).alphas_cumprod
    prior = IdealDenoiserPrior.from_images({"a": images(1)})
    assert isinstance(prior, DiffusionPrior)
    assert prior.num_train_timesteps == 1000 and prior.alphas_cumprod.dtype == torch.float32
    assert torch.allclose(prior.alphas_cumprod, reference.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("t", [0, 10, 500, 999])
def test_one_reference_is_always_the_answer(t):
    image = images(1)
    prior = IdealDenoiserPrior.from_images({"a": image})
    x_t = 3.0 * torch.randn(4, 3, 8, 8)
    emb = prior.embed_texts(["a", "", "a", ""])
    x0 = prior.denoise(x_t, torch.full((4,), t), emb)
    assert torch.allclose(x0, (image * 2 - 1).expand(4, -1, -1, -1), atol=1e-6)
    eps = prior.predict_noise(x_t, torch.full((4,), t), emb)
    a = prior.alphas_cumprod.double()[t]
    expected = (x_t.double() - a.sqrt() * (image.double() * 2 - 1)) / (1 - a).sqrt()
    assert torch.allclose(eps.double(), expected, atol=1e-4)


def test_two_references_match_hand_computed_weights():
    pair = images(2, size=8, seed=5)
    prior = IdealDenoiserPrior.from_images({"a": pair})
    t = 300
    a = float(prior.alphas_cumprod.double()[t])
    x = pair * 2 - 1
    # x_t on the segment between the scaled images, placed so that the logits differ by about 0.7
    m = 0.5 + 0.7 * (1 - a) / (a * float((x[0] - x[1]).square().sum()))
    x_t = math.sqrt(a) * (m * x[0] + (1 - m) * x[1])
    # by hand, from the definition: logits l_i = −‖x_t − √ᾱ x_i‖² / (2(1−ᾱ))
    logits = [-((x_t.double() - math.sqrt(a) * x[i].double()) ** 2).sum().item() / (2 * (1 - a)) for i in range(2)]
    w0 = 1.0 / (1.0 + math.exp(logits[1] - logits[0]))
    assert 0.01 < w0 < 0.99  # a case where both images matter
    weights = prior.posterior_weights(x_t[None], torch.tensor([t]), prior.embed_texts(["a"]))
    assert torch.allclose(weights, torch.tensor([[w0, 1 - w0]], dtype=torch.float64), atol=1e-9)
    x0 = prior.denoise(x_t[None], torch.tensor([t]), prior.embed_texts(["a"]))
    assert torch.allclose(x0[0].double(), w0 * x[0].double() + (1 - w0) * x[1].double(), atol=1e-6)


def test_a_data_variance_gives_the_exact_gaussian_mixture_posterior_mean():
    """References with data variance σ_d²·I: E[x0|x_t] = Σ_i w_i (μ_i + σ_d² a/(a²σ_d² + s²)(x_t − a μ_i)),
    w_i ∝ N(x_t; a μ_i, (a²σ_d² + s²) I), computed here by hand in float64."""
    pair = images(2, size=8, seed=5).double()
    sigma = 0.3
    prior = IdealDenoiserPrior.from_images({"a": pair}, data_sigma=sigma)
    mu = pair.flatten(1) * 2 - 1
    for t in (0, 300, 999):
        alpha = float(prior.alphas_cumprod.double()[t])
        a, s2 = math.sqrt(alpha), 1.0 - alpha
        var = alpha * sigma ** 2 + s2
        noise = torch.randn(mu.shape[1], generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        x_t = a * (0.5 * mu[0] + 0.5 * mu[1]) + 0.2 * noise
        logits = torch.stack([-(x_t - a * mu[i]).square().sum() / (2 * var) for i in range(2)])
        w = torch.softmax(logits, 0)
        expected = sum(w[i] * (mu[i] + sigma ** 2 * a / var * (x_t - a * mu[i])) for i in range(2))
        got = prior.denoise(x_t.view(1, 3, 8, 8), torch.tensor([t]), prior.embed_texts(["a"]))
        assert got.dtype == torch.float64
        assert torch.allclose(got.flatten(), expected, rtol=0, atol=1e-12)
    exact = IdealDenoiserPrior.from_images({"a": pair})
    assert exact.data_sigma == 0.0  # the default is the exact denoiser of the images themselves
    with pytest.raises(ValueError, match="data_sigma"):
        IdealDenoiserPrior.from_images({"a": pair}, data_sigma=-0.1)


def test_stable_at_tiny_noise_and_far_inputs():
    prior = IdealDenoiserPrior.from_images({"a": images(5)})
    x_t = 100.0 * torch.randn(2, 3, 8, 8)
    eps = prior.predict_noise(x_t, torch.tensor([0, 999]), prior.embed_texts(["a", ""]))
    assert torch.isfinite(eps).all()


def test_counts_one_call_per_batch(two_sets):
    emb = two_sets.embed_texts(["alpha", "", "beta"])
    two_sets.predict_noise(torch.randn(3, 3, 8, 8), torch.tensor([5, 6, 7]), emb)
    assert (two_sets.counters.calls, two_sets.counters.images) == (1, 3)


def test_conditioning_selects_the_scene(two_sets):
    x_t = torch.randn(3, 3, 8, 8)
    weights = two_sets.posterior_weights(x_t, torch.tensor([900] * 3), two_sets.embed_texts(["alpha", "beta", ""]))
    assert torch.all(weights[0, 3:] == 0) and torch.all(weights[1, :3] == 0)
    assert torch.allclose(weights.sum(1), torch.ones(3, dtype=torch.float64))
    assert (weights[2] > 0).all()  # the unconditional branch is the union of both sets


def test_texts(two_sets):
    assert two_sets.embed_texts(["alpha", "", "beta, back view", " Alpha "]).tolist() == [0, -1, 1, 0]
    assert two_sets.embed_texts(["beta"]).dtype == torch.long
    with pytest.raises(ValueError, match="alpha, beta"):
        two_sets.embed_texts(["a teapot"])
    with pytest.raises(ValueError, match="scene indices"):
        two_sets.predict_noise(torch.randn(1, 3, 8, 8), torch.tensor([5]), torch.tensor([7]))


def test_classifier_free_guidance(two_sets):
    x_t, t = torch.randn(2, 3, 8, 8), torch.tensor([600, 600])
    cams = evaluation_cameras(2)
    conditioning = PromptConditioning(two_sets, "alpha", PLAIN)
    uncond = two_sets.predict_noise(x_t, t, two_sets.embed_texts(["", ""]))
    cond = two_sets.predict_noise(x_t, t, two_sets.embed_texts(["alpha", "alpha"]))
    assert torch.allclose(conditioning.guided_noise(x_t, t, cams, 0.0), uncond, atol=1e-5)
    assert torch.allclose(conditioning.guided_noise(x_t, t, cams, 1.0), cond, atol=1e-5)
    assert torch.allclose(conditioning.guided_noise(x_t, t, cams, 7.5), uncond + 7.5 * (cond - uncond), atol=1e-4)
    # the prior is view-agnostic: every view text is the scene, so Perp-Neg's repulsion vanishes
    perp = PromptConditioning(two_sets, "alpha", PromptConfig())
    guided = perp.guided_noise(x_t, t, evaluation_cameras(2), 7.5)
    assert torch.allclose(guided, uncond + 7.5 * (cond - uncond), atol=1e-3)


def test_sds_and_sdi_run_unchanged(two_sets):
    conditioning = PromptConditioning(two_sets, "beta", PLAIN)
    latents = two_sets.encode_images(torch.rand(2, 3, 16, 16))
    for cfg in (SDSConfig(), SDIConfig()):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        target = guidance_target(cfg, conditioning, two_sets.alphas_cumprod, latents, evaluation_cameras(2), 500, gens)
        assert target.shape == latents.shape and torch.isfinite(target).all()


def test_encode_decode(two_sets):
    big = torch.rand(2, 3, 32, 32, requires_grad=True)
    latents = two_sets.encode_images(big)
    assert latents.shape == (2, 3, 8, 8) and latents.min() >= -1 and latents.max() <= 1
    latents.sum().backward()
    assert big.grad is not None and big.grad.abs().sum() > 0
    same = torch.rand(1, 3, 8, 8)
    assert torch.allclose(two_sets.decode_latents(two_sets.encode_images(same)), same, atol=1e-6)
    assert torch.allclose(two_sets.references("beta"), images(2, seed=2))
    union, labels = two_sets.union_references()
    assert union.shape == (5, 3, 8, 8) and labels.tolist() == [0, 0, 0, 1, 1]


@pytest.mark.parametrize("kwargs, message", [
    ({"image_size": 4}, "image_size"), ({"image_size": 512}, "image_size"), ({"image_size": 32.0}, "image_size"),
    ({"n_references": 0}, "reference images"), ({"n_references": 10 ** 7}, "reference images"),
    ({"scenes": ["teapot"]}, "known scenes"),
])
def test_refuses_bad_settings(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        IdealDenoiserPrior(cache_dir=tmp_path, **kwargs)


def test_cache_round_trip_and_detection(tmp_path, count_renders):
    settings = dict(scenes=["duck"], n_references=6, image_size=16, cache_dir=tmp_path)
    first = IdealDenoiserPrior(**settings)
    assert count_renders == ["duck"]
    path = tmp_path / f"duck-m6-s16-seed0-v{prior_module.FORMAT_VERSION}.pt"
    assert path.exists() and not list(tmp_path.glob("*.tmp"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a good cache loads without a word
        second = IdealDenoiserPrior(**settings)
    assert count_renders == ["duck"]  # loaded, not re-rendered
    assert torch.equal(first.references("duck"), second.references("duck"))

    def tamper(edit):
        blob = torch.load(path, weights_only=True)
        edit(blob)
        torch.save(blob, path)

    cases = [
        (lambda: path.write_bytes(path.read_bytes()[:100]), "unreadable"),
        (lambda: tamper(lambda b: b["meta"].update(scene_version=99)), "scene_version"),
        (lambda: tamper(lambda b: b["images"].view(-1)[:10].add_(1)), "checksum mismatch"),
    ]
    for damage, reason in cases:
        damage()
        with pytest.warns(UserWarning, match=f"{path}.*{reason}"):
            rebuilt = IdealDenoiserPrior(**settings)
        assert torch.equal(rebuilt.references("duck"), first.references("duck"))
    assert count_renders == ["duck"] * 4
    IdealDenoiserPrior(**settings)
    assert count_renders == ["duck"] * 4  # the rebuilt file is good again


def test_scene_version_bump_rebuilds(tmp_path, count_renders, monkeypatch):
    settings = dict(scenes=["lamp"], n_references=2, image_size=8, cache_dir=tmp_path)
    IdealDenoiserPrior(**settings)
    import dataclasses

    monkeypatch.setitem(SCENES, "lamp", dataclasses.replace(SCENES["lamp"], version=2))
    with pytest.warns(UserWarning, match="scene_version"):
        IdealDenoiserPrior(**settings)
    assert count_renders == ["lamp", "lamp"]


def test_load_prior_ideal():
    prior = load_prior("ideal:16", torch.device("cpu"))
    assert isinstance(prior, IdealDenoiserPrior) and prior.image_size == 16
    assert prior.scene_names == list(SCENES) and len(prior.references("mug")) == 256
    with pytest.raises(ValueError, match="ideal:<image size>"):
        load_prior("ideal:big", torch.device("cpu"))


def test_chunked_references_give_the_same_answer(two_sets, monkeypatch):
    x_t, t = torch.randn(2, 3, 8, 8), torch.tensor([200, 700])
    emb = two_sets.embed_texts(["", "beta"])
    whole = two_sets.predict_noise(x_t, t, emb)
    monkeypatch.setattr(prior_module, "CHUNK_BYTES", 2 * 3 * 8 * 8 * 8)  # two references per chunk
    chunked = IdealDenoiserPrior.from_images({"alpha": images(3, seed=1), "beta": images(2, seed=2)})
    assert chunked._flat64 is None
    assert torch.allclose(chunked.predict_noise(x_t, t, emb), whole, atol=1e-5)


def test_leaving_out_negligible_references_does_not_change_the_posterior_mean(monkeypatch):
    """At small t nearly every reference has a weight below NEGLIGIBLE_WEIGHT and is left out of the
    product; the mean must be that of all references to float64 rounding (a tiny-noise x_t near one
    reference: a few carry weight; a large-noise one: all do, and the full product is taken)."""
    refs = {"alpha": images(40, seed=3), "beta": images(40, seed=4)}
    prior = IdealDenoiserPrior.from_images(refs)
    noise = torch.randn(2, 3 * 8 * 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = (refs["alpha"][:2].double() * 2 - 1).flatten(1) + 0.01 * noise
    labels = torch.tensor([0, -1])
    for t in (5, 900):
        alpha = prior._alphas64[torch.tensor([t, t])]
        weights = torch.softmax(prior._logits(x, alpha, labels), dim=1)
        kept = (weights > prior_module.NEGLIGIBLE_WEIGHT).any(0).sum().item()
        assert (kept < 10) if t == 5 else (kept == 80)  # the pruned path is taken at small t only
        exact = weights @ prior._flat64  # every reference, one product
        assert torch.allclose(prior._posterior_mean(x, alpha, labels), exact, rtol=0, atol=1e-13)
