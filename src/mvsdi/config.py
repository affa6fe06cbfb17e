"""The resolved configuration of a run, and the named presets.

A run is fully described by ``RunConfig``; it is written to the run directory as JSON and can be
read back (``RunConfig.from_dict``). Presets are functions of the prompt that return a RunConfig;
command-line overrides are applied on top with ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any, Callable

from mvsdi.aggregation import AggregationConfig
from mvsdi.cameras import SAMPLERS, CameraRanges, check_sampler
from mvsdi.field import FieldConfig
from mvsdi.guidance import GuidanceConfig, SDIConfig, SDSConfig
from mvsdi.knobs import knob, names
from mvsdi.overrides import apply_all
from mvsdi.priors.prompts import PromptConfig
from mvsdi.priors.stable_diffusion import DEFAULT_MODEL, FAST_UNET_MODES
from mvsdi.render import RenderConfig
from mvsdi.schedules import (SCHEDULE_MODES, LevelSchedule, LossWeights, Ramp, Schedules, ShadingSchedule,
                             reference_schedules, steps_for_budget)


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """'name: old → new' for every leaf that differs between two config dicts (``to_dict()`` or read
    back from JSON: a tuple and the list JSON made of it are the same value)."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += config_differences(a, b, f"{prefix}{key}.")
        elif _as_json(a) != _as_json(b):
            lines.append(f"{prefix}{key}: {a!r} → {b!r}")
    return lines


def _as_json(value: Any) -> Any:
    return [_as_json(v) for v in value] if isinstance(value, (tuple, list)) else value


def is_ideal(model: str) -> bool:
    """The weights-free testbed prior (``ideal`` / ``ideal:<size>``), not a network: runs with it
    are measured against the truth (``mvsdi.models.load_prior`` builds it)."""
    return model == "ideal" or model.startswith("ideal:")


DEFAULT_BUDGET = 10_000
VIEW_BATCHING = ("auto", "batched", "sequential")
# Renders smaller than 8 pixels a side run but carry no shape: the convexity regulariser compares
# neighbouring normals on an 8x8 grid of each render, and the testbed's ideal prior needs 8 too.
# No multiple of 8 is needed: every prior resizes a render to its own input size before the VAE.
MIN_RESOLUTION = 8
RESOLUTION_REASON = ("smaller renders hold no shape to judge (the convexity regulariser compares neighbouring "
                     "normals on an 8x8 grid of each render). Any size from 8 up works, not only multiples of 8: "
                     "the prior resizes renders to its own input size (512 for Stable Diffusion 2.1)")


@dataclass(frozen=True)
class OptimConfig:
    """Adam as in the SDI configuration: one learning rate for the field, a smaller one for the background."""

    lr: float = knob(0.01, "Adam learning rate of the field")
    background_lr: float = knob(0.001, "Adam learning rate of the background")
    betas: tuple[float, float] = knob((0.9, 0.99), "Adam betas")
    eps: float = knob(1e-15, "Adam eps")


@dataclass(frozen=True)
class RunConfig:
    """A run, every knob of it. Each field is declared with ``knobs.knob``: its help text and flags
    make `mvsdi generate`'s options (``--its.dotted.path``; see ``mvsdi.arguments``)."""

    prompt: str = knob(help="the text prompt, e.g. \"a ripe strawberry\"", method=False)
    # the run's folder is named by ``run_label``, which says whether the method is still the preset's
    preset: str = knob(help="the preset this config started from (options may have changed the method since)",
                       method=False)
    guidance: GuidanceConfig = knob(help="the score distillation guidance: SDS or SDI, by the preset")
    views: int = knob(1, "K, views (guidance evaluations) per optimiser step; each sampler accepts only some K "
                         "(below)", flags=("--views", "-k"))
    sampler: str = knob("random", f"how the K views of a step are drawn: {', '.join(SAMPLERS)} (K rules below)",
                        flags=("--sampler",))
    budget: int = knob(DEFAULT_BUDGET, "guidance evaluations in the whole run; must be a multiple of K; "
                                       "steps = budget / K", flags=("--budget",), method=False)
    seed: int = knob(0, "seeds initialisation, cameras and noise: same seed and options, same run (below)",
                     flags=("--seed",), method=False)
    model: str = knob(DEFAULT_MODEL, "diffusers folder or hub id of the prior; tiny or random-sd21: random weights, "
                                     "no download; ideal or ideal:N: the testbed's exact denoiser, the prompt naming "
                                     "a scene", flags=("--model",), method=False)
    device: str = knob("auto", "auto, cpu, cuda, cuda:N or mps (auto: cuda if there is one)", flags=("--device",),
                       execution=True)
    resolution: int = knob(512, f"side of the training renders in pixels, >= {MIN_RESOLUTION} (the prior resizes "
                                "to its own input size)", flags=("--resolution",), method=False)
    samples_per_ray: int = knob(64, "samples along each ray", flags=("--samples-per-ray",), method=False)
    perturb_samples: bool = knob(True, "jitter sample positions along rays while training (stratified sampling)")
    eval_views: int = knob(50, "number of evaluation renders", flags=("--eval-views",), method=False)
    eval_resolution: int = knob(512, f"side of the evaluation renders, >= {MIN_RESOLUTION}",
                                flags=("--eval-resolution",), method=False)
    prompts: PromptConfig = knob(help="view-dependent prompts and Perp-Neg", default_factory=PromptConfig)
    cameras: CameraRanges = knob(help="where training cameras and point lights are drawn from",
                                 default_factory=CameraRanges)
    field: FieldConfig = knob(help="the hash-grid field", default_factory=FieldConfig)
    schedules: Schedules = knob(help="everything scheduled over the budget fraction spent",
                                default_factory=Schedules)
    # applied after every other option (``apply_settings``): it derives the schedules for the final K
    schedule: str = knob("budget", "budget: schedules in fractions of the budget, the same for every K; reference: "
                                   "the MV-SDI reference's step-counted schedules for this K (K = 1, 2, 4, 6, 8)",
                         flags=("--schedule",))
    aggregation: AggregationConfig = knob(help="how the K per-view gradients become one",
                                          default_factory=AggregationConfig)
    optim: OptimConfig = knob(help="Adam", default_factory=OptimConfig)
    # render.DENSE renders every sample
    render: RenderConfig = knob(help="empty-space skipping and early ray termination (the reference's)",
                                default_factory=RenderConfig)
    checkpoint_every: int = knob(1000, "optimiser steps between checkpoints (and one at the end)",
                                 flags=("--checkpoint-every",), execution=True)
    view_batching: str = knob("auto", f"K>1: batched = one prior pass for a step's K views, sequential = one per "
                                      f"view, auto = batched on CUDA (the gradient is the same up to float "
                                      f"rounding); one of {', '.join(VIEW_BATCHING)}",
                              flags=("--view-batching",), execution=True)
    fast_unet: str = knob("off", f"run the UNet eagerly or under torch.compile or CUDA graphs (see "
                                 f"docs/performance.md); one of {', '.join(FAST_UNET_MODES)}",
                          flags=("--fast-unet",), execution=True)
    max_consecutive_skips: int = knob(10, "non-finite steps in a row before rolling back to the last checkpoint",
                                      method=False)
    max_rollbacks: int = knob(3, "rollbacks before the run stops as diverged", method=False)

    def __post_init__(self) -> None:
        if not self.prompt or not self.prompt.strip():
            raise ValueError("the prompt is empty: give a text such as \"a ripe strawberry\"")
        check_sampler(self.sampler, self.views)
        steps_for_budget(self.budget, self.views)
        if self.view_batching not in VIEW_BATCHING:
            raise ValueError(f"view_batching must be one of {', '.join(VIEW_BATCHING)}, got {self.view_batching!r}")
        if self.fast_unet not in FAST_UNET_MODES:
            raise ValueError(f"fast_unet must be one of {', '.join(FAST_UNET_MODES)}, got {self.fast_unet!r}")
        for name in ("samples_per_ray", "eval_views", "checkpoint_every", "max_consecutive_skips", "max_rollbacks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self._check_schedule()
        for name in ("resolution", "eval_resolution"):
            if getattr(self, name) < MIN_RESOLUTION:
                raise ValueError(f"{name} must be >= {MIN_RESOLUTION} pixels a side, got {getattr(self, name)}: "
                                 f"{RESOLUTION_REASON}")

    def _check_schedule(self) -> None:
        if self.schedule not in SCHEDULE_MODES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULE_MODES)}, got {self.schedule!r}")
        if self.schedule == "reference":
            span = getattr(self.guidance, "t_anneal_span", float(self.views))
            if self.schedules != reference_schedules(self.views, self.schedules) or span != self.views:
                raise ValueError(f"schedule 'reference' but the schedules are not the reference's for K={self.views}: "
                                 "derive them with config.with_schedule(config, 'reference') after changing K")

    @property
    def steps(self) -> int:
        return steps_for_budget(self.budget, self.views)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        return _build(cls, data)


def with_schedule(config: RunConfig, mode: str) -> RunConfig:
    """``config`` with the schedules of ``mode``: "reference" derives the MV-SDI reference's schedules
    for the config's K (and SDI's t-anneal over K budget fractions); "budget" restores the defaults."""
    if mode == "reference":
        schedules, span = reference_schedules(config.views, config.schedules), float(config.views)
    elif mode == "budget":
        schedules, span = Schedules(weights=dataclasses.replace(LossWeights(), tv=config.schedules.weights.tv)), 1.0
    else:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULE_MODES)}, got {mode!r}")
    guidance = config.guidance
    if guidance.kind == "sdi":
        guidance = dataclasses.replace(guidance, t_anneal_span=span)
    return dataclasses.replace(config, schedule=mode, schedules=schedules, guidance=guidance)


def execution_settings() -> tuple[str, ...]:
    """The fields that say how a run executes, not what it computes: a resume may change them."""
    return names(RunConfig, execution=True)


def apply_settings(config: RunConfig, settings: dict[str, Any]) -> RunConfig:
    """``config`` with the fields at dotted paths set, all at once (a text value is parsed by the
    field's declared type); ``schedule`` comes last, as ``with_schedule``, so that it derives the
    schedules for the final K."""
    settings = dict(settings)
    schedule = settings.pop("schedule", None)
    config = apply_all(config, settings) if settings else config
    return with_schedule(config, schedule) if schedule is not None else config


# --------------------------------------------------------------------------------------------
# presets

VIEW_PROMPTS_ONLY = PromptConfig(view_dependent=True, perp_neg=False)


def _sds(prompt: str, views: int, sampler: str, name: str) -> RunConfig:
    return RunConfig(prompt=prompt, preset=name, guidance=SDSConfig(), views=views, sampler=sampler,
                     prompts=VIEW_PROMPTS_ONLY)


def _sdi(prompt: str, views: int, sampler: str, name: str, **settings: Any) -> RunConfig:
    return RunConfig(prompt=prompt, preset=name, guidance=SDIConfig(), views=views, sampler=sampler,
                     prompts=PromptConfig(view_dependent=True, perp_neg=True), **settings)


# the reference's moderate octahedral config (mvsd-octa6-moderate): extremes at -30° and 60°
OCTAHEDRAL_CAMERAS = CameraRanges(elevation_deg=(-30.0, 60.0))
OCTAHEDRAL_BUDGET = 9_996  # 6 does not divide 10,000; the reference runs 1,666 steps
CONSENSUS = AggregationConfig(kind="consensus")

# The paper's table (SDI rows, with the reference config each reproduces), then the SDS variants.
PRESETS: dict[str, tuple[str, Callable[[str], RunConfig]]] = {
    "sdi": ("SDI baseline (inverted noise, Perp-Neg), K=1 random view per step [configs/sdi.yaml]",
            lambda p: _sdi(p, 1, "random", "sdi")),
    "mvsdi-k2-uniform": ("MV-SDI K=2, stratified azimuths (the paper's 'uniform' row) [mvsd.yaml]",
                         lambda p: _sdi(p, 2, "stratified", "mvsdi-k2-uniform")),
    "mvsdi-k2": ("MV-SDI K=2 antithetic antipodal pair, the headline [mvsd-anti2.yaml]",
                 lambda p: _sdi(p, 2, "antipodal", "mvsdi-k2")),
    "mvsdi-k4": ("MV-SDI K=4, two antipodal pairs [mvsd-anti4.yaml]", lambda p: _sdi(p, 4, "antipodal", "mvsdi-k4")),
    "mvsdi-k4-mixed": ("MV-SDI K=4, an antipodal pair plus a top/bottom pair [mvsd-mixed4.yaml]",
                       lambda p: _sdi(p, 4, "mixed", "mvsdi-k4-mixed")),
    "mvsdi-k6-octa": ("MV-SDI K=6 octahedral: four azimuths 90° apart at elevation 0, elevations -30° and 60° "
                      "[mvsd-octa6-moderate.yaml]",
                      lambda p: _sdi(p, 6, "octahedral", "mvsdi-k6-octa", cameras=OCTAHEDRAL_CAMERAS,
                                     budget=OCTAHEDRAL_BUDGET)),
    "mvsdi-k8": ("MV-SDI K=8, four antipodal pairs [mvsd-anti8.yaml]", lambda p: _sdi(p, 8, "antipodal", "mvsdi-k8")),
    "cw-mvsdi-k2": ("CW-MV-SDI K=2: antipodal pair, views weighted by their consensus [mvsd-anti2-cw.yaml]",
                    lambda p: _sdi(p, 2, "antipodal", "cw-mvsdi-k2", aggregation=CONSENSUS)),
    "sds": ("DreamFusion SDS, one random view per step", lambda p: _sds(p, 1, "random", "sds")),
    "mvsds-k2": ("SDS with K=2 antipodal views per step", lambda p: _sds(p, 2, "antipodal", "mvsds-k2")),
    "mvsds-k4": ("SDS with K=4 views (two antipodal pairs) per step", lambda p: _sds(p, 4, "antipodal", "mvsds-k4")),
}


def preset(name: str, prompt: str, **overrides: Any) -> RunConfig:
    """The preset ``name`` for ``prompt`` with top-level fields replaced by ``overrides``.

    ``schedule="reference"`` derives the reference's schedules for the final K (after overrides).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    # Build with a stand-in prompt, then replace: the replace re-runs validation on the real
    # prompt and the overrides together, so an empty prompt gets the prompt's error message.
    base = PRESETS[name][1]("stand-in")
    schedule = overrides.pop("schedule", None) or base.schedule
    config = dataclasses.replace(base, prompt=prompt, **{k: v for k, v in overrides.items() if v is not None})
    return with_schedule(config, schedule) if schedule != config.schedule else config


def preset_of(config: RunConfig) -> RunConfig | None:
    """The preset ``config`` started from, built with its prompt, seed, model, sizes and execution
    settings (every knob outside the method); None when that name is no preset or cannot take them."""
    if config.preset not in PRESETS:
        return None
    outside = {name: getattr(config, name) for name in names(RunConfig, method=False) if name != "preset"}
    try:
        return preset(config.preset, **outside)
    except ValueError:
        return None


def run_label(config: RunConfig, start: RunConfig | None) -> str:
    """What names the run (its folder): the preset's name while the method is the preset's, i.e.
    ``config`` differs from ``start`` (``preset_of(config)``, or as the command line builds it)
    only outside the method; otherwise the method's own label, e.g. ``sdi-k4-antipodal``."""
    if start is not None and start.preset == config.preset and not method_differences(start, config):
        return config.preset
    label = f"{config.guidance.kind}-k{config.views}-{config.sampler}"
    return label if config.aggregation.kind == "mean" else f"{label}-{config.aggregation.kind}"


def method_differences(old: RunConfig, new: RunConfig) -> list[str]:
    """``config_differences`` of the method's knobs only."""
    outside = set(names(RunConfig, method=False))
    old_dict, new_dict = ({k: v for k, v in c.to_dict().items() if k not in outside} for c in (old, new))
    return config_differences(old_dict, new_dict)


# --------------------------------------------------------------------------------------------
# reading a config back from JSON

_NESTED = {"prompts": PromptConfig, "cameras": CameraRanges, "field": FieldConfig, "optim": OptimConfig,
           "render": RenderConfig, "aggregation": AggregationConfig}
_SCHEDULES = {"levels": LevelSchedule, "shading": ShadingSchedule, "weights": LossWeights}


def _tuples(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """JSON turns tuples into lists; give them back as tuples so configs compare equal."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}


def _build(cls: type[RunConfig], data: dict[str, Any]) -> RunConfig:
    values = dict(data)
    kind = values["guidance"].get("kind")
    guidance_cls = {"sds": SDSConfig, "sdi": SDIConfig}.get(kind)
    if guidance_cls is None:
        raise ValueError(f"config has an unknown guidance kind {kind!r}")
    values["guidance"] = guidance_cls(**_tuples(guidance_cls, values["guidance"]))
    for name, sub in _NESTED.items():
        if name in values:
            values[name] = sub(**_tuples(sub, values[name]))
    if "schedules" in values:
        parts = {}
        for name, sub in _SCHEDULES.items():
            raw = values["schedules"].get(name, {})
            if sub is LossWeights:
                parts[name] = LossWeights(**{k: Ramp(**v) for k, v in raw.items()})
            else:
                parts[name] = sub(**raw)
        values["schedules"] = Schedules(**parts)
    return cls(**_tuples(cls, values))

