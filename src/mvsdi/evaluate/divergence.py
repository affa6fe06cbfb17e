"""Has a run diverged? The reference's rule, on the evaluation renders.

A run counts as diverged when it is missing, has fewer than ``MIN_VIEWS`` renders, or when more than
half of its views are degenerate: mean intensity below ``MEAN_FLOOR`` (nearly black: the field
collapsed to empty space) or standard deviation below ``STD_FLOOR`` (nearly flat: one colour, no
object). Images are in [0, 1]; mean and std are taken over all pixels and channels of a view.
Diverged prompts are excluded pairwise by the aggregation; this module only flags them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

MIN_VIEWS = 5
MEAN_FLOOR = 0.02
STD_FLOOR = 0.012


@dataclass(frozen=True)
class Divergence:
    diverged: bool
    reason: str | None  # None when not diverged
    views: int
    degenerate_views: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_degenerate(image: torch.Tensor) -> bool:
    """One view [3, H, W] (or any shape) in [0, 1]: nearly black or nearly flat."""
    x = image.detach().float()
    # population std (unbiased=False): the spread of the pixels themselves, not an estimate
    return bool(x.mean() < MEAN_FLOOR or x.std(unbiased=False) < STD_FLOOR)


def missing() -> Divergence:
    return Divergence(True, "run missing", 0, 0)


def check_divergence(images: Sequence[torch.Tensor] | None) -> Divergence:
    """The rule applied to a run's renders (None: the run does not exist)."""
    if images is None:
        return missing()
    n = len(images)
    if n < MIN_VIEWS:
        return Divergence(True, f"only {n} renders (fewer than {MIN_VIEWS})", n, 0)
    bad = sum(is_degenerate(image) for image in images)
    if bad * 2 > n:  # strictly more than half; exactly half is not diverged
        return Divergence(True, f"{bad} of {n} views are degenerate (mean < {MEAN_FLOOR} or std < {STD_FLOOR})", n, bad)
    return Divergence(False, None, n, bad)
