"""Priors and prompt conditioning, on CPU and offline.

A tiny random-weight SD stack is written once per session and loaded through the real loader;
the guidance arithmetic is checked against a fake prior whose noise is a known linear function
of the text embedding, so every expected value is computed by hand here.
"""

import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

import pytest
import torch

from mvsdi.cameras import Cameras
from mvsdi.priors import (NetworkCounters, PriorLoadError, PromptConditioning, PromptConfig, StableDiffusionPrior,
                          perp_neg_plan, write_random_stable_diffusion)
from mvsdi.priors.tiny import MARKER, character_vocab

PROMPT = "a red chair"


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    return write_random_stable_diffusion(tmp_path_factory.mktemp("stacks") / "tiny", "tiny", seed=0)


@pytest.fixture
def prior(stack):
    return StableDiffusionPrior(str(stack))


def cameras(azimuth, elevation=None):
    az = torch.tensor(azimuth)
    el = torch.zeros_like(az) if elevation is None else torch.tensor(elevation)
    n = az.shape[0]
    return Cameras(az, el, torch.full((n,), 2.0), torch.full((n,), 50.0), torch.zeros(n, 3))


# ---------------------------------------------------------------------------------------------
# loading


def test_missing_folder_names_it_and_says_how_to_fix(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(PriorLoadError) as info:
        StableDiffusionPrior(missing)
    message = str(info.value)
    assert missing in message and "--model" in message and "Manojb/stable-diffusion-2-1-base" in message


def test_folder_without_diffusers_layout_is_refused(tmp_path):
    with pytest.raises(PriorLoadError, match="unet"):
        StableDiffusionPrior(str(tmp_path))


def test_unknown_hub_id_fails_fast_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(PriorLoadError) as info:
        StableDiffusionPrior("no-such-owner/no-such-model")
    assert time.perf_counter() - start < 10.0
    message = str(info.value)
    assert "no-such-owner/no-such-model" in message and "HF_HUB_OFFLINE" in message and "mirror" in message


def test_stack_is_reused_not_rebuilt(stack):
    stamp = (stack / MARKER).stat().st_mtime_ns
    assert write_random_stable_diffusion(stack, "tiny", seed=0) == stack
    assert (stack / MARKER).stat().st_mtime_ns == stamp


def test_loaded_prior_is_frozen_and_sd_shaped(prior):
    assert prior.image_size == 32 and prior.num_train_timesteps == 1000
    a = prior.alphas_cumprod
    assert a.dtype == torch.float32 and a.shape == (1000,) and bool((a[1:] < a[:-1]).all())
    assert a[0].item() == pytest.approx(1 - 0.00085, rel=1e-5)  # scaled_linear betas start at 0.00085
    for module in (prior.unet, prior.vae, prior.text_encoder):
        assert not module.training and not any(p.requires_grad for p in module.parameters())


def test_saved_tokenizer_reloads_and_tokenises_characters(prior):
    tokenizer = prior.tokenizer
    assert len(tokenizer) == len(character_vocab())
    ids = tokenizer("a cat, 3").input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>"
    assert tokens[1:-1] == ["a</w>", "c", "a", "t</w>", ",</w>", "3</w>"]


# ---------------------------------------------------------------------------------------------
# the prior protocol


def test_encode_is_differentiable_deterministic_and_resizes(prior):
    images = torch.rand(2, 3, 40, 24, requires_grad=True)
    latents = prior.encode_images(images)
    assert latents.shape == (2, 4, 16, 16) and latents.dtype == torch.float32
    latents.square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert torch.equal(prior.encode_images(images.detach()), latents.detach())


def test_decode_gives_images_in_unit_range(prior):
    images = prior.decode_latents(torch.randn(3, 4, 16, 16))
    assert images.shape == (3, 3, 32, 32) and not images.requires_grad
    assert images.min() >= 0 and images.max() <= 1


def test_embed_texts_encodes_each_text_once(prior, monkeypatch):
    forward = prior.text_encoder.forward
    batches = []

    def counting(input_ids, *args, **kwargs):
        batches.append(input_ids.shape[0])
        return forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(prior.text_encoder, "forward", counting)
    first = prior.embed_texts(["a cat", "a dog", "a cat"])
    assert batches == [2]  # one batched call, duplicates encoded once
    again = prior.embed_texts(["a dog", "a cat"])
    assert batches == [2]  # all cached
    prior.embed_texts(["a cat", "a fish"])
    assert batches == [2, 1]  # only the new text
    assert first.shape == (3, 77, 16) and torch.equal(first[0], first[2])
    assert torch.equal(again[0], first[1]) and not torch.allclose(first[0], first[1])


def test_predict_noise_counts_one_call_and_n_images(prior):
    embeddings = prior.embed_texts(["a cat"] * 3)
    eps = prior.predict_noise(torch.randn(3, 4, 16, 16), torch.tensor([1, 500, 999]), embeddings)
    assert eps.shape == (3, 4, 16, 16) and eps.dtype == torch.float32
    assert prior.counters == NetworkCounters(calls=1, images=3)


# ---------------------------------------------------------------------------------------------
# classifier-free guidance on the real (tiny) prior


def test_cfg_scale_one_is_conditional_and_zero_is_unconditional(stack, float64):
    # float64: the guided call batches [cond | uncond] (batch 4) where the direct calls do not
    # (batch 2), and batched float32 kernels round differently on other CPUs and thread counts
    prior = StableDiffusionPrior(str(stack), dtype=torch.float64)
    conditioning = PromptConditioning(prior, PROMPT, PromptConfig(perp_neg=False))
    x, t, cams = torch.randn(2, 4, 16, 16), torch.tensor([300, 700]), cameras([0.0, 180.0])
    cond = prior.embed_texts([f"{PROMPT}, front view", f"{PROMPT}, back view"])
    eps_c = prior.predict_noise(x, t, cond)
    eps_u = prior.predict_noise(x, t, prior.embed_texts(["", ""]))
    prior.counters.reset()
    assert eps_c.dtype == torch.float64
    tight = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(conditioning.guided_noise(x, t, cams, 1.0), eps_c, **tight)
    torch.testing.assert_close(conditioning.guided_noise(x, t, cams, 0.0), eps_u, **tight)
    inverted = conditioning.guided_noise(x, t, cams, -7.5)
    torch.testing.assert_close(inverted, eps_u - 7.5 * (eps_c - eps_u), **tight)
    assert prior.counters == NetworkCounters(calls=3, images=12)


# ---------------------------------------------------------------------------------------------
# the guidance arithmetic, on a fake prior with known noise


class LinearFakePrior:
    """ε̂(x, t, e) = x + A·vec(e): linear in the embedding, so mixtures of texts are predictable."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.shape, self.device = (2, 3, 3), torch.device("cpu")
        self.A = torch.randn(18, 5 * 4, generator=g)
        self.table: dict[str, torch.Tensor] = {}
        self.generator = g
        self.counters = NetworkCounters()
        self.inputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def embed_texts(self, texts):
        for text in texts:
            self.table.setdefault(text, torch.randn(5, 4, generator=self.generator))
        return torch.stack([self.table[t] for t in texts])

    def eps_of(self, x, e):
        return x + (e.reshape(e.shape[0], -1) @ self.A.T).reshape(e.shape[0], *self.shape)

    def predict_noise(self, latents_t, t, embeddings):
        self.counters.calls += 1
        self.counters.images += latents_t.shape[0]
        self.inputs.append((latents_t, t, embeddings))
        return self.eps_of(latents_t, embeddings)


def f(abc, r):
    a, b, c = abc
    return a * math.exp(-b * r) + c


def text(view):
    return f"{PROMPT}, {view} view"


def test_view_dependent_text_is_chosen_per_camera():
    fake = LinearFakePrior()
    conditioning = PromptConditioning(fake, PROMPT, PromptConfig(perp_neg=False))
    cams = cameras([0.0, 44.0, 90.0, -100.0, 180.0, -150.0, 10.0], [0.0] * 6 + [75.0])
    n = len(cams)
    conditioning.guided_noise(torch.zeros(n, *fake.shape), torch.full((n,), 5), cams, 7.5)
    (_, t, embeddings), = fake.inputs
    views = ["front", "front", "side", "side", "back", "back", "overhead"]
    torch.testing.assert_close(embeddings[:n], fake.embed_texts([text(v) for v in views]))
    torch.testing.assert_close(embeddings[n:], fake.embed_texts([""] * n))
    assert t.tolist() == [5] * (2 * n) and fake.counters == NetworkCounters(1, 2 * n)


def test_without_view_dependence_the_plain_prompt_conditions_every_camera():
    fake = LinearFakePrior()
    conditioning = PromptConditioning(fake, PROMPT, PromptConfig(view_dependent=False, perp_neg=False))
    conditioning.guided_noise(torch.zeros(2, *fake.shape), torch.tensor([1, 2]), cameras([0.0, 180.0]), 7.5)
    torch.testing.assert_close(fake.inputs[0][2][:2], fake.embed_texts([PROMPT, PROMPT]))


def test_texts_are_embedded_once_at_construction():
    fake = LinearFakePrior()
    calls = []
    embed = fake.embed_texts
    fake.embed_texts = lambda texts: calls.append(list(texts)) or embed(texts)
    conditioning = PromptConditioning(fake, PROMPT, PromptConfig(negative_prompt="blurry"))
    for azimuth in (0.0, 120.0):
        conditioning.guided_noise(torch.zeros(1, *fake.shape), torch.tensor([3]), cameras([azimuth]), 7.5)
    assert len(calls) == 1 and set(calls[0]) >= {text(v) for v in ("front", "side", "back", "overhead")} | {"blurry"}


def hand_perp_neg(fake, x, emb_pos, negatives, weights, scale):
    """Perp-Neg for one latent, written out with flat vectors."""
    uncond = fake.embed_texts([""])
    eps = lambda e: fake.eps_of(x[None], e[None] if e.ndim == 2 else e)[0].flatten()  # noqa: E731
    e_u, e_pos = eps(uncond[0]), eps(emb_pos)
    d = e_pos - e_u
    total = d.clone()
    for emb, w in zip(negatives, weights):
        a = eps(emb) - e_u
        perp = a - (a @ d) / (d @ d) * d
        assert abs(float(perp @ d)) < 1e-3 * float(d.norm() * a.norm())  # orthogonal by construction
        total += w * perp
    return (e_u + scale * total).reshape(fake.shape)


@pytest.mark.parametrize("scale", [7.5, -7.5])
def test_perp_neg_matches_hand_computation(scale):
    fake = LinearFakePrior()
    conditioning = PromptConditioning(fake, PROMPT)
    emb = dict(zip(["front", "side", "back"], fake.embed_texts([text(v) for v in ("front", "side", "back")])))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, *fake.shape, generator=g)
    out = conditioning.guided_noise(x, torch.tensor([10, 20, 30]), cameras([30.0, -135.0, 180.0]), scale)
    assert fake.counters == NetworkCounters(calls=1, images=12)

    r = 1 - 30 / 90  # front half: r weighs front against side
    expected0 = hand_perp_neg(fake, x[0], r * emb["front"] + (1 - r) * emb["side"], [emb["front"], emb["side"]],
                              [-f((4, 0.5, -2.426), r), -f((4, 0.5, -2.426), 1 - r)], scale)
    r = 2 - 135 / 90  # back half: r weighs side against back
    expected1 = hand_perp_neg(fake, x[1], r * emb["side"] + (1 - r) * emb["back"], [emb["side"], emb["front"]],
                              [-f((1, 0.5, -0.606), r), -f((1, 0.5, 0.967), r)], scale)
    expected2 = hand_perp_neg(fake, x[2], emb["back"], [emb["side"], emb["front"]],
                              [-f((1, 0.5, -0.606), 0), -f((1, 0.5, 0.967), 0)], scale)
    torch.testing.assert_close(out, torch.stack([expected0, expected1, expected2]), rtol=1e-4, atol=1e-4)


def test_perp_neg_component_is_orthogonal_to_the_positive_direction():
    fake = LinearFakePrior()
    conditioning = PromptConditioning(fake, PROMPT)
    x, t, cams = torch.randn(2, *fake.shape), torch.tensor([1, 1]), cameras([20.0, 160.0])
    with_negatives = conditioning.guided_noise(x, t, cams, 2.0)
    _, _, embeddings = fake.inputs[0]
    eps = fake.eps_of(x.repeat(4, 1, 1, 1), embeddings)
    e_pos, e_u = eps[:2], eps[6:]
    repel = (with_negatives - e_u) / 2.0 - (e_pos - e_u)
    inner = (repel * (e_pos - e_u)).sum(dim=(1, 2, 3))
    assert repel.abs().max() > 1e-2 and inner.abs().max() < 1e-3


def test_perp_neg_schedule_by_azimuth():
    cfg = PromptConfig()
    plan = perp_neg_plan(torch.tensor([0.0, 45.0, -45.0, 90.0, 180.0, -180.0, 30.0]),
                         torch.tensor([0.0] * 6 + [80.0]), cfg)
    front, side, back, overhead = torch.eye(5)[:4]
    torch.testing.assert_close(plan.positive[0], front)  # azimuth 0: pure front
    torch.testing.assert_close(plan.positive[1], 0.5 * front + 0.5 * side)
    torch.testing.assert_close(plan.positive[2], plan.positive[1])  # left/right symmetric
    torch.testing.assert_close(plan.positive[3], side)
    torch.testing.assert_close(plan.positive[4], back)
    torch.testing.assert_close(plan.positive[5], back)
    torch.testing.assert_close(plan.positive[6], overhead)
    # the view a camera is pure in is barely repelled; the others are (threestudio's numbers)
    assert plan.weights[0].tolist() == pytest.approx([-(4 * math.exp(-0.5) - 2.426), -(4 - 2.426)], abs=1e-5)
    assert plan.weights[0, 0].abs() < 1e-3 and plan.weights[3, 0].abs() < 1e-3
    assert plan.weights[4].tolist() == pytest.approx([-(1 - 0.606), -(1 + 0.967)], abs=1e-5)
    assert plan.weights[6].tolist() == [0.0, 0.0]
    assert plan.negatives[0].tolist() == [0, 1] and plan.negatives[4].tolist() == [1, 0]


def test_perp_neg_at_the_front_sends_the_front_text_as_positive():
    fake = LinearFakePrior()
    conditioning = PromptConditioning(fake, PROMPT)
    conditioning.guided_noise(torch.zeros(1, *fake.shape), torch.tensor([1]), cameras([0.0]), 7.5)
    _, _, embeddings = fake.inputs[0]
    torch.testing.assert_close(embeddings[0], fake.embed_texts([text("front")])[0])


# ---------------------------------------------------------------------------------------------
# configuration errors


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt_is_refused(prompt):
    with pytest.raises(ValueError, match="prompt is empty"):
        PromptConditioning(LinearFakePrior(), prompt)


def test_perp_neg_without_view_dependent_prompts_is_refused():
    with pytest.raises(ValueError, match="view-dependent"):
        PromptConfig(view_dependent=False, perp_neg=True)


def test_camera_count_must_match_latents():
    conditioning = PromptConditioning(LinearFakePrior(), PROMPT)
    with pytest.raises(ValueError, match="one camera per latent"):
        conditioning.guided_noise(torch.zeros(2, 2, 3, 3), torch.tensor([1, 1]), cameras([0.0]), 7.5)
