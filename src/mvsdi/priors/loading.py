"""From a ``--model`` string to a loaded prior.

Besides hub ids and local folders, two names build random-weight stacks in code (no download) and
load them through the same ``from_pretrained`` path as a real model:
- ``tiny``: a few-thousand-parameter SD-shaped stack for tests and CPU smoke runs;
- ``random-sd21``: the real SD-2.1-base shapes with random weights, for speed and memory measurements.
"""

from __future__ import annotations

import torch

from mvsdi.priors.stable_diffusion import StableDiffusionPrior
from mvsdi.priors.tiny import tiny_model_folder, write_random_stable_diffusion

RANDOM_STACKS = {"tiny": "tiny", "random-sd21": "sd21-base"}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this torch has no CUDA device; use --device cpu")
    return torch.device(device)


def load_prior(model: str, device: torch.device) -> StableDiffusionPrior:
    if model in RANDOM_STACKS:
        shape = RANDOM_STACKS[model]
        folder = write_random_stable_diffusion(tiny_model_folder().parent / f"random-{shape}", shape=shape)
        return StableDiffusionPrior(str(folder), device=device)
    return StableDiffusionPrior(model, device=device)
