"""The protocol every 2D diffusion prior implements, so guidance and distillation never see diffusers.

A prior works in its own latent space: images go in through ``encode_images`` (differentiably,
so the renderer receives the gradient), noise predictions come out of ``predict_noise``. All
tensors crossing the protocol are float32; a prior that runs in half precision casts inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass
class NetworkCounters:
    """How much work the denoising network did: the cost measure of the benchmarks.

    ``calls`` counts forward invocations (one per batch), ``images`` counts batch elements, so a
    CFG call on N latents adds 1 and 2N (4N with Perp-Neg).

    ``images`` is the arithmetic done and does not depend on how views are grouped. ``calls`` is
    the number of launches: with a step's K views batched (``RunConfig.view_batching``) the K
    views' guided calls become one, so calls per step drop K-fold (SDS: 1 instead of K; SDI:
    its grid's calls once instead of K times) while images stay. "UNet forward passes per
    guidance evaluation" in the sense of docs/design.md (one per guided call of one view) is therefore
    ``images / (CFG batch factor × evaluations)``, not ``calls / evaluations``.
    """

    calls: int = 0
    images: int = 0

    def reset(self) -> None:
        self.calls = 0
        self.images = 0


@runtime_checkable
class DiffusionPrior(Protocol):
    image_size: int  # side length of the RGB images the network was trained on
    num_train_timesteps: int
    alphas_cumprod: torch.Tensor  # [T] float32 on ``device``
    device: torch.device
    counters: NetworkCounters

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[N,3,H,W] in [0,1] → latents [N,C,h,w] float32, differentiable w.r.t. ``images``."""
        ...

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → [N,3,H,W] in [0,1], without gradient (for logging)."""
        ...

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """[N, ...] conditioning tensors, without gradient; each distinct text is encoded once."""
        ...

    def predict_noise(self, latents_t: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """ε̂ for the whole batch in one network call; ``t`` is a [N] long tensor."""
        ...
