"""A run folder as the evaluator reads it (its config, version and numbered renders), and the
prompt lists R-precision draws its candidates from. The layer under the evaluation proper
(``runs``), the protocols, the reference renders and the convergence curves."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Sequence

import imageio.v3 as iio
import numpy as np
import torch

import mvsdi
from mvsdi.rundir import CONFIG, RENDERS, SUMMARY

BENCHMARK_PROMPTS = "sdi43_prompts.txt"
_RENDER = re.compile(r"^(\d{3,})\.png$")  # the RGB views; normal_NNN.png are not evaluated


class RunError(ValueError):
    """A run directory that cannot be evaluated as asked; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# prompt lists


def prompt_key(prompt: str) -> str:
    # CLIP's tokenizer lowercases and splits on whitespace, so these differences are invisible to it
    return " ".join(prompt.lower().split())


def parse_prompt_lines(lines: Sequence[str], source: str) -> list[str]:
    """One prompt per line; a blank line or a repeated prompt is an error naming its line numbers."""
    blank = [i for i, line in enumerate(lines, 1) if not line.strip()]
    if blank:
        raise ValueError(f"{source}: blank line(s) {blank}; one prompt per line, no empty lines")
    first: dict[str, int] = {}
    repeats = []
    for i, line in enumerate(lines, 1):
        key = prompt_key(line)
        if key in first:
            repeats.append(f"line {i} repeats line {first[key]}")
        first.setdefault(key, i)
    if repeats:
        raise ValueError(f"{source}: duplicate prompt(s): {'; '.join(repeats)}")
    return [line.strip() for line in lines]


def read_prompt_file(path: str | Path) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read the prompt file {path}: {exc}") from exc
    return parse_prompt_lines(text.splitlines(), str(path))


def benchmark_prompts() -> list[str]:
    """The 43 prompts of the SDI benchmark, shipped with the package."""
    text = files("mvsdi").joinpath("data", BENCHMARK_PROMPTS).read_text(encoding="utf-8")
    return parse_prompt_lines(text.splitlines(), BENCHMARK_PROMPTS)


def candidate_prompts(run_prompts: Sequence[str], prompt_list: Sequence[str]) -> list[str]:
    """R-Precision's candidates: the runs' own prompts and the benchmark list, each text once."""
    seen: dict[str, str] = {}
    for prompt in [*run_prompts, *prompt_list]:
        seen.setdefault(prompt_key(prompt), prompt)
    return list(seen.values())


# ---------------------------------------------------------------------------------------------
# reading a run


@dataclass
class Run:
    path: Path
    prompt: str
    expected_views: int
    renders: list[Path]  # sorted by view index
    version: str | None


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def _check_version(path: Path, force: bool) -> str | None:
    summary_path = path / SUMMARY
    try:
        version = json.loads(summary_path.read_text())["versions"]["mvsdi"]
    except (OSError, ValueError, KeyError, TypeError):
        if force:
            return None
        raise RunError(f"{path}: no readable {SUMMARY} with versions.mvsdi (an incomplete run, or not written by "
                       "`mvsdi generate`); pass --force to evaluate its renders anyway") from None
    if _major_minor(version) != _major_minor(mvsdi.__version__) and not force:
        raise RunError(f"{path}: written by mvsdi {version}, this is mvsdi {mvsdi.__version__}; renders of another "
                       "minor version may differ (cameras, resolution). Re-render, or pass --force to evaluate anyway")
    return version


def read_run(path: str | Path, force: bool = False) -> Run | None:
    """The run at ``path``, validated; None when no directory exists there (a run that never completed)."""
    path = Path(path)
    if not path.exists():
        return None
    if not path.is_dir():
        raise RunError(f"{path} is not a directory; give run directories written by `mvsdi generate`")
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"{path}: no readable {CONFIG} ({exc}); is this a run directory?") from exc
    prompt = config.get("prompt") if isinstance(config, dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise RunError(f"{path}/{CONFIG} has no prompt")
    version = _check_version(path, force)
    found = sorted((int(m.group(1)), p) for p in (path / RENDERS).glob("*.png") if (m := _RENDER.match(p.name)))
    expected = int(config.get("eval_views") or len(found))
    return Run(path, prompt.strip(), expected, [p for _, p in found], version)


def view_index(path: Path) -> int:
    return int(_RENDER.match(path.name).group(1))


def load_images(paths: Sequence[Path]) -> list[torch.Tensor]:
    """PNG files → [3, H, W] float tensors in [0, 1] (alpha dropped, grey expanded)."""
    images = []
    for p in paths:
        array = np.asarray(iio.imread(p))
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        scale = 65535.0 if array.dtype == np.uint16 else 255.0
        images.append(torch.from_numpy(array[..., :3].astype(np.float32) / scale).permute(2, 0, 1))
    return images
