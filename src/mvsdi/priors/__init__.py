"""2D diffusion priors behind one protocol, and the prompt conditioning that drives them."""

from mvsdi.priors.base import DiffusionPrior, NetworkCounters
from mvsdi.priors.prompts import PerpNegPlan, PromptConditioning, PromptConfig, perp_neg_plan, perpendicular
from mvsdi.priors.stable_diffusion import DEFAULT_MODEL, PriorLoadError, StableDiffusionPrior
from mvsdi.priors.tiny import cache_root, write_random_stable_diffusion

__all__ = [
    "DEFAULT_MODEL", "DiffusionPrior", "NetworkCounters", "PerpNegPlan", "PriorLoadError", "PromptConditioning",
    "PromptConfig", "StableDiffusionPrior", "perp_neg_plan", "perpendicular", "cache_root",
    "write_random_stable_diffusion",
]
