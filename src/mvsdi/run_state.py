"""A run's state beyond its parameters: what it has spent, and how to save, restore and roll it back.

A snapshot holds everything needed to continue a run exactly: the trainable state (weights, Adam
moments, occupancy grid, CW-MV-SDI's τ: the run's own ``state_dict``), the counters, the prior's
call counts, the global random generators, the config and the mvsdi version. Its keys are those of
``checkpoint.pt`` (README's run directory table), so checkpoints written before stay readable.

A rollback is not a restore: it returns the trainable state and the step counter to a good
snapshot but keeps what was spent (guidance evaluations, skipped steps), so the budget stays
honest about the work a discarded trajectory cost.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

import mvsdi
from mvsdi.config import RunConfig
from mvsdi.priors.base import DiffusionPrior


@dataclass
class Counters:
    # spent, including the evaluations of steps that a rollback later discarded (honest accounting)
    guidance_evaluations: int = 0
    steps: int = 0  # optimiser steps of the current trajectory (a rollback winds it back)
    skipped_steps: int = 0  # steps not applied because their loss or gradient was not finite
    consecutive_skips: int = 0
    rollbacks: int = 0  # returns to the last good checkpoint after too many consecutive skips

    def rolled_back_to(self, steps: int, count: bool = True) -> "Counters":
        """The counters after returning to step ``steps``: what was spent is kept, the skip streak ends."""
        return Counters(guidance_evaluations=self.guidance_evaluations, steps=steps,
                        skipped_steps=self.skipped_steps, rollbacks=self.rollbacks + int(count))


class Resumable(Protocol):
    """What a run exposes to be saved and continued (``mvsdi.distill.Distiller``)."""

    config: RunConfig
    prior: DiffusionPrior
    counters: Counters

    def state_dict(self) -> dict[str, Any]: ...  # the trainable state: tensors and plain values

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def cpu_copy(obj: Any) -> Any:
    """A deep copy of a (nested) state dict with every tensor cloned to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: cpu_copy(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(value) for value in obj)
    return copy.deepcopy(obj)


def rng_state() -> dict[str, Any]:
    """The global generators. The loop itself draws from generators keyed by (seed, step, view), so
    these only matter to code outside it; they are saved so a resumed process continues as one."""
    numpy_state = np.random.get_state(legacy=False)
    # as tensors and plain values, so the checkpoint loads with torch.load(weights_only=True)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = copy.deepcopy(state["numpy"])
    numpy_state["state"]["key"] = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(numpy_state)
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def snapshot(run: Resumable) -> dict[str, Any]:
    """Everything needed to continue ``run`` exactly: a CPU copy, safe to keep while training goes on."""
    return cpu_copy({
        **run.state_dict(), "counters": dataclasses.asdict(run.counters),
        "prior_counters": {"calls": run.prior.counters.calls, "images": run.prior.counters.images},
        "rng": rng_state(), "config": run.config.to_dict(), "mvsdi_version": mvsdi.__version__,
    })


def restore(run: Resumable, state: dict[str, Any]) -> None:
    """Continue from ``snapshot``'s state (same config): trainable state, counters, generators."""
    run.load_state_dict(state)
    run.counters = Counters(**state["counters"])
    run.prior.counters.calls = state["prior_counters"]["calls"]
    run.prior.counters.images = state["prior_counters"]["images"]
    set_rng_state(state["rng"])


def roll_back(run: Resumable, good: dict[str, Any], count: bool = True) -> None:
    """Return the trainable state and the step counter to the snapshot ``good``; what was spent is kept.

    ``count``: whether this is a rollback proper (it then moves the steps to fresh random streams)
    rather than a return to the last good state when giving up.
    """
    run.load_state_dict(good)
    run.counters = run.counters.rolled_back_to(good["counters"]["steps"], count)


def evaluations_at_end(config: RunConfig, steps_done: int, spent: int) -> int:
    """Guidance evaluations spent once the plan's last step is done if no step runs again: ``spent``
    plus ``views`` per step left. The budget, until a rollback has steps run again."""
    return spent + (config.steps - steps_done) * config.views
