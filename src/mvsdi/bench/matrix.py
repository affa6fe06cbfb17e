"""The benchmark matrix: presets × prompts × seeds, one run directory per cell, and its spec file.

``OUT/bench.json`` holds the spec (presets, prompts, seeds, overrides, baseline, metrics), so that
``--aggregate-only OUT`` rebuilds the same matrix without the original command line.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mvsdi.atomic_files import atomic_write_json
from mvsdi.config import PRESETS, RunConfig, config_differences, preset
from mvsdi.evaluate.run_folder import RunError, read_run
from mvsdi.rundir import CONFIG, SUMMARY, prompt_slug, read_json

SPEC_FILE = "bench.json"
DONE_STATUSES = ("completed", "diverged")  # a run that reached its end; "interrupted" is redone
# the RunConfig knobs a bench may set for every cell (left out: the preset's value): none of the
# method, so that each cell is still its preset (tested); their flags and parsing come from the
# knobs' declarations (mvsdi.arguments), and a name that is no knob fails when the parser is built
OVERRIDES = ("budget", "resolution", "samples_per_ray", "eval_views", "eval_resolution", "model", "device")


@dataclass(frozen=True)
class BenchSpec:
    presets: tuple[str, ...]
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    overrides: dict[str, Any] = field(default_factory=dict)
    baseline: str = ""  # default: the first preset
    metrics: tuple[str, ...] = ()  # default: every metric of the prior's kind

    def __post_init__(self) -> None:
        unknown = [p for p in self.presets if p not in PRESETS]
        if unknown or not self.presets:
            raise ValueError(f"unknown preset(s) {unknown or list(self.presets)}; choose from: {', '.join(PRESETS)}")
        if len(set(self.presets)) != len(self.presets):
            raise ValueError(f"--presets names a preset twice: {', '.join(self.presets)}")
        if not self.prompts:
            raise ValueError("no prompts: give --prompts FILE with one prompt per line, or leave it out for the 43")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {list(self.seeds)}")
        bad = set(self.overrides) - set(OVERRIDES)
        if bad:
            raise ValueError(f"cannot override {sorted(bad)} for a whole bench; allowed: {', '.join(OVERRIDES)}")
        if not self.baseline:
            object.__setattr__(self, "baseline", self.presets[0])
        if self.baseline not in self.presets:
            raise ValueError(f"--baseline {self.baseline!r} is not among the presets ({', '.join(self.presets)})")

    @property
    def model(self) -> str:
        return self.cell_config(self.presets[0], self.prompts[0], self.seeds[0]).model

    def cell_config(self, preset_name: str, prompt: str, seed: int) -> RunConfig:
        return preset(preset_name, prompt, seed=seed, **self.overrides)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BenchSpec":
        return cls(presets=tuple(data["presets"]), prompts=tuple(data["prompts"]), seeds=tuple(data["seeds"]),
                   overrides=dict(data.get("overrides", {})), baseline=data.get("baseline", ""),
                   metrics=tuple(data.get("metrics", ())))


@dataclass(frozen=True)
class Cell:
    preset: str
    prompt: str
    seed: int
    path: Path
    config: RunConfig

    @property
    def key(self) -> str:
        """A stable name of the cell: its run directory relative to the bench's output."""
        return f"{self.preset}/{prompt_slug(self.prompt)}/s{self.seed}"


def cells(spec: BenchSpec, out: Path) -> list[Cell]:
    """Every cell, configs built (and so validated) before any run starts."""
    slugs: dict[str, str] = {}
    for prompt in spec.prompts:
        other = slugs.setdefault(prompt_slug(prompt), prompt)
        if other != prompt:
            raise ValueError(f"prompts {other!r} and {prompt!r} share the directory name {prompt_slug(prompt)!r}; "
                             "make them differ in their first 60 letters or digits")
    return [Cell(name, prompt, seed, out / name / prompt_slug(prompt) / f"s{seed}",
                 spec.cell_config(name, prompt, seed))
            for name in spec.presets for prompt in spec.prompts for seed in spec.seeds]


def write_spec(out: Path, spec: BenchSpec) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / SPEC_FILE, spec.to_dict())


def read_spec(out: Path) -> BenchSpec:
    try:
        data = json.loads((Path(out) / SPEC_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{out} has no readable {SPEC_FILE} ({exc}); "
                         "give the OUT of an earlier `mvsdi bench`") from exc
    return BenchSpec.from_dict(data)


# ---------------------------------------------------------------------------------------------
# the state of a cell's run directory


def differences_on_disk(cell: Cell) -> list[str]:
    """'field: on disk → wanted' where the run on disk was made with another config than the cell's
    (empty: the same config)."""
    return config_differences(read_json(cell.path / CONFIG, {}), cell.config.to_dict())


def run_status(cell: Cell) -> str | None:
    return read_json(cell.path / SUMMARY, {}).get("status")


def redo_reason(cell: Cell) -> str | None:
    """None when the cell is done; otherwise why it must be (re)run.

    Done: its run reached its end, with exactly this cell's config, and passes ``mvsdi eval``'s
    rules (a summary from this mvsdi minor version) with all its evaluation renders.
    """
    if not cell.path.exists():
        return "not run yet"
    status = run_status(cell)
    if status not in DONE_STATUSES:
        return f"the run there has status {status!r}"
    diff = differences_on_disk(cell)
    if diff:
        return f"the run there was made with another config (differs in: {'; '.join(diff)})"
    try:
        run = read_run(cell.path)
    except RunError as exc:
        return str(exc)
    if len(run.renders) < run.expected_views:
        return f"the run there has {len(run.renders)} of its {run.expected_views} evaluation renders"
    return None


def is_done(cell: Cell) -> bool:
    return redo_reason(cell) is None
