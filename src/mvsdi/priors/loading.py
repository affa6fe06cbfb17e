"""From a ``--model`` string to a loaded prior.

Besides hub ids and local folders, two names build random-weight stacks in code (no download) and
load them through the same ``from_pretrained`` path as a real model:
- ``tiny``: a few-thousand-parameter SD-shaped stack for tests and CPU smoke runs;
- ``random-sd21``: the real SD-2.1-base shapes with random weights, for speed and memory measurements.

``ideal`` / ``ideal:<size>`` is not a network: the exact denoiser of the testbed scenes' renders.
"""

from __future__ import annotations

import torch

from mvsdi.priors.base import DiffusionPrior
from mvsdi.priors.stable_diffusion import StableDiffusionPrior
from mvsdi.priors.tiny import cache_root, write_random_stable_diffusion

RANDOM_STACKS = {"tiny": "tiny", "random-sd21": "sd21-base"}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this torch has no CUDA device; use --device cpu")
    return torch.device(device)


def load_prior(model: str, device: torch.device) -> DiffusionPrior:
    if model == "ideal" or model.startswith("ideal:"):
        # the weights-free testbed: the exact denoiser of all registered scenes' renders (cached)
        from mvsdi.testbed.prior import IdealDenoiserPrior

        size = model.partition(":")[2]
        if size and not size.isdigit():
            raise ValueError(f"model {model!r}: write 'ideal' or 'ideal:<image size>', e.g. 'ideal:64'")
        return IdealDenoiserPrior(image_size=int(size) if size else 64, device=device)
    if model in RANDOM_STACKS:
        shape = RANDOM_STACKS[model]
        folder = write_random_stable_diffusion(cache_root() / f"random-{shape}", shape=shape)
        return StableDiffusionPrior(str(folder), device=device)
    return StableDiffusionPrior(model, device=device)
