"""Evaluation protocols: which views of a run are scored, and the rules around them.

``ours`` (the default): the run's own evaluation renders ``renders/NNN.png`` (V = ``eval_views``
evenly spaced azimuths from the front, 360°/V apart, elevation 15°, distance 2, fovy 70°); Janus
pairs view 0 with view V/2 (the back); R-Precision retrieves among the prompt list plus the prompts
of the runs evaluated, a tie counting as a miss; results in ``RUN/metrics.json``.

``reference``: the MV-SDI reference's ``scripts/evaluate.py`` on threestudio's test views. The
turntable is 120 azimuths ``linspace(0, 360, 120)`` (both ends included: 0° and 360° are the same
camera) at elevation 15°, distance 2, fovy 70° (threestudio's test dataset with the reference's
configs); 50 of them are scored, turntable indices ``linspace(0, 119, 50)`` truncated to integers.
Janus pairs the first and the middle (``len // 2``) of the 50 scored views: turntable views 0 and
60 (181.5°, not 180°). R-Precision is the top-1 (argmax: a tie goes to the earlier candidate)
among exactly the prompt list (the 43 benchmark prompts by default), which must hold the run's
prompt. The scored views are rendered from the run's checkpoint into ``RUN/renders_reference/``
(named by turntable index) when the run does not hold them yet; results in
``RUN/metrics_reference.json``, so the two protocols never overwrite each other.

Both use the same metric models, preprocessing and divergence rule (``divergence.py``, on the
protocol's scored views).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch

from mvsdi.evaluate.run_folder import candidate_prompts, prompt_key

# the reference's turntable: threestudio's test split with n_test_views = 120, and the views it scores
REFERENCE_TURNTABLE_VIEWS = 120
REFERENCE_SCORED_VIEWS = 50  # scripts/evaluate.py --max-images 50
REFERENCE_ELEVATION_DEG = 15.0  # threestudio's eval_elevation_deg default
REFERENCE_DISTANCE = 2.0  # eval_camera_distance of configs/sdi.yaml and the mvsd configs
REFERENCE_FOVY_DEG = 70.0  # eval_fovy_deg of the same configs


@dataclass(frozen=True)
class EvaluationProtocol:
    """What differs between protocols; the metrics themselves are shared."""

    name: str
    metrics_file: str  # in the run directory
    renders: str  # the run's folder holding the scored views
    add_run_prompts: bool  # R-Precision's candidates: the prompt list plus the runs' own prompts
    r_precision_ties: str  # "miss" (a tie is not a retrieval) or "first" (argmax: the earlier candidate wins)
    description: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


OURS = EvaluationProtocol(
    "ours", "metrics.json", "renders", add_run_prompts=True, r_precision_ties="miss",
    description="the run's eval_views renders (evenly spaced azimuths from 0°, elevation 15°); Janus: views 0 and "
                "V/2; R-Precision among the prompt list and the runs' prompts, ties are misses")
REFERENCE = EvaluationProtocol(
    "reference", "metrics_reference.json", "renders_reference", add_run_prompts=False, r_precision_ties="first",
    description="MV-SDI reference (scripts/evaluate.py): 50 of the 120 turntable views linspace(0, 360, 120) at "
                "elevation 15°, taken by linspace(0, 119, 50) as ints; Janus: scored views 0 and len//2; "
                "R-Precision top-1 (argmax) among exactly the prompt list")
PROTOCOLS: dict[str, EvaluationProtocol] = {p.name: p for p in (OURS, REFERENCE)}


def get_protocol(name: str) -> EvaluationProtocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {name!r}; choose one of: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


# ---------------------------------------------------------------------------------------------
# the reference's views


def reference_turntable_azimuths() -> torch.Tensor:
    """[120] degrees, as threestudio's test split makes them (float32 linspace, 360° included)."""
    return torch.linspace(0.0, 360.0, REFERENCE_TURNTABLE_VIEWS)


def reference_view_indices(turntable: int = REFERENCE_TURNTABLE_VIEWS,
                           scored: int = REFERENCE_SCORED_VIEWS) -> list[int]:
    """The turntable indices scored: numpy's linspace cast by ``dtype=int`` (truncation), as the
    reference's ``load_images``; all views when there are no more than ``scored``."""
    if turntable <= scored:
        return list(range(turntable))
    return [int(i) for i in np.linspace(0, turntable - 1, scored, dtype=int)]


def janus_positions(n_views: int) -> tuple[int, int] | None:
    """Positions (front, back) in a list of ``n_views`` scored views: the first and the middle one;
    None with fewer than two views (the reference then has no Janus score)."""
    return (0, n_views // 2) if n_views >= 2 else None


# ---------------------------------------------------------------------------------------------
# R-Precision's candidates


def protocol_candidates(protocol: EvaluationProtocol, run_prompts: Sequence[str],
                        prompt_list: Sequence[str]) -> list[str]:
    """The candidate prompts under ``protocol``; a ValueError when the reference protocol's list
    lacks a run's prompt (its retrieval would have no right answer)."""
    if protocol.add_run_prompts:
        return candidate_prompts(run_prompts, prompt_list)
    listed = {prompt_key(p) for p in prompt_list}
    absent = [p for p in dict.fromkeys(run_prompts) if prompt_key(p) not in listed]
    if absent:
        raise ValueError(f"--protocol {protocol.name}: R-Precision retrieves among exactly the prompt list "
                         f"({len(prompt_list)} prompts), which lacks the prompt(s) {absent}. Pass --prompts FILE "
                         "with a list that holds them, or use --protocol ours")
    return list(prompt_list)
