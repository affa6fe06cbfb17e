"""From a ``--model`` string to a loaded prior, for every family of priors.

This module sits above both families (``mvsdi.priors``: Stable Diffusion stacks, real or random;
``mvsdi.testbed``: the exact ideal denoiser of the testbed scenes' renders), so neither has to
import the other.
"""

from __future__ import annotations

import torch

from mvsdi.config import is_ideal
from mvsdi.priors.base import DiffusionPrior
from mvsdi.priors.loading import load_network_prior
from mvsdi.testbed.prior import IdealDenoiserPrior

IDEAL_DEFAULT_SIZE = 64


def load_prior(model: str, device: torch.device) -> DiffusionPrior:
    """``ideal`` / ``ideal:<size>``: the ideal denoiser of all registered scenes (references cached);
    anything else: ``priors.loading.load_network_prior`` (tiny, random-sd21, a folder or a hub id)."""
    if is_ideal(model):
        size = model.partition(":")[2]
        if size and not size.isdigit():
            raise ValueError(f"model {model!r}: write 'ideal' or 'ideal:<image size>', e.g. 'ideal:64'")
        return IdealDenoiserPrior(image_size=int(size) if size else IDEAL_DEFAULT_SIZE, device=device)
    return load_network_prior(model, device)
