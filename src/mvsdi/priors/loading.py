"""Loading the network priors, and resolving ``--device``. (``mvsdi.models.load_prior`` turns any
``--model`` string into a prior, the testbed's ideal denoiser included.)

Besides hub ids and local folders, two names build random-weight stacks in code (no download) and
load them through the same ``from_pretrained`` path as a real model:
- ``tiny``: a few-thousand-parameter SD-shaped stack for tests and CPU smoke runs;
- ``random-sd21``: the real SD-2.1-base shapes with random weights, for speed and memory measurements.
"""

from __future__ import annotations

import torch

from mvsdi.priors.base import DiffusionPrior
from mvsdi.priors.stable_diffusion import StableDiffusionPrior
from mvsdi.priors.tiny import cache_root, write_random_stable_diffusion

RANDOM_STACKS = {"tiny": "tiny", "random-sd21": "sd21-base"}


DEVICE_CHOICES = "auto, cpu, cuda, cuda:N (N below the number of GPUs) or mps (Apple GPUs)"


def _available_devices() -> str:
    """The device strings this machine can use, for error messages."""
    names = ["auto", "cpu"]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count:
        names += ["cuda"] + [f"cuda:{i}" for i in range(count)]
    if torch.backends.mps.is_available():
        names.append("mps")
    return ", ".join(names)


def resolve_device(device: str) -> torch.device:
    """The torch device a ``--device`` string names; a ValueError saying what is valid otherwise.

    Generate, export, eval, bench and testbed all resolve their ``--device`` here, so every CLI
    turns a device it cannot use into its usual exit 2, never a traceback from deep in torch.
    """
    name = str(device).strip()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device 'mps' asked for, but this torch has no usable MPS (Apple GPU) backend; "
                             f"use one of: {_available_devices()}")
        return torch.device("mps")
    kind, colon, index = name.partition(":")
    if kind != "cuda" or (colon and not index.isdigit()):
        raise ValueError(f"unknown device {device!r}: give {DEVICE_CHOICES}; this machine can use: "
                         f"{_available_devices()}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this torch has no CUDA device; use --device cpu")
    if colon and int(index) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s); use one of: {_available_devices()}")
    return torch.device(name)


def load_network_prior(model: str, device: torch.device) -> DiffusionPrior:
    """A Stable Diffusion stack: a random one built in code (``RANDOM_STACKS``), a folder or a hub id."""
    if model in RANDOM_STACKS:
        shape = RANDOM_STACKS[model]
        folder = write_random_stable_diffusion(cache_root() / f"random-{shape}", shape=shape)
        return StableDiffusionPrior(str(folder), device=device)
    return StableDiffusionPrior(model, device=device)
