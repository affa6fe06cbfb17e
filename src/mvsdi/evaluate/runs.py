"""Evaluating run directories: read and validate a run, compute its metrics, write ``metrics.json``.

Every metric is computed per evaluation view and then averaged over the views of the run (one
prompt); the per-view values are kept in ``metrics.json`` so other aggregations stay possible.
Which views are scored, and where the results go, is the evaluation protocol's (``protocol.py``):
``ours`` by default, ``reference`` for the MV-SDI reference's (``metrics_reference.json``).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import mvsdi
from mvsdi.evaluate import clip_metrics as cm
from mvsdi.evaluate import image_reward as ir
from mvsdi.evaluate.divergence import Divergence, check_divergence, missing
from mvsdi.evaluate.protocol import OURS, EvaluationProtocol, get_protocol, janus_positions
from mvsdi.rundir import CONFIG, RENDERS, SUMMARY, atomic_write_json

METRICS_FILE = OURS.metrics_file  # the default protocol's; the reference's is metrics_reference.json
KNOWN_METRICS = ("clip_score", "r_precision", "clip_iqa", "janus", "divergence", "hpsv2", "image_reward")
# hpsv2 (ViT-H/14, ≈1 B parameters) and image_reward (BLIP ViT-L + BERT, ≈0.45 B) are big: only when asked for
DEFAULT_METRICS = ("clip_score", "r_precision", "clip_iqa", "janus", "divergence")
BENCHMARK_PROMPTS = "sdi43_prompts.txt"
_RENDER = re.compile(r"^(\d{3,})\.png$")  # the RGB views; normal_NNN.png are not evaluated


class RunError(ValueError):
    """A run directory that cannot be evaluated as asked; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# inputs: metric names and prompt lists


def parse_metrics(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in KNOWN_METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {unknown or [text]}; known metrics: {', '.join(KNOWN_METRICS)}")
    return names


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
                       "`mvsdi generate`); pass --force to evaluate its renders anyway")
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


@dataclass
class Views:
    """The views of a run that a protocol scores."""

    images: list[torch.Tensor]
    ids: list[int]  # per image: its view index (ours) or turntable index (reference)
    janus: tuple[int, int] | None  # the view ids of (front, back); None: the protocol has no pair
    expected: int  # how many views the protocol scores
    source: str  # where the images came from, for metrics.json


def view_index(path: Path) -> int:
    return int(_RENDER.match(path.name).group(1))


def ours_views(run: Run) -> Views:
    """The run's own evaluation renders; Janus pairs view 0 with view V/2 (V = eval_views)."""
    return Views(load_images(run.renders), [view_index(p) for p in run.renders], (0, run.expected_views // 2),
                 run.expected_views, f"{RENDERS}/")


def reference_views(run: Run, device: str | torch.device) -> Views:
    """The reference's 50 scored turntable views (rendered from the checkpoint when the run lacks
    them); Janus pairs the first and the middle one of the 50."""
    from mvsdi.evaluate.reference_renders import find_or_render  # here: that module imports this one

    found, source = find_or_render(run.path, device)
    ids = [i for i, _ in found]
    pair = janus_positions(len(ids))
    return Views(load_images([p for _, p in found]), ids, None if pair is None else (ids[pair[0]], ids[pair[1]]),
                 len(ids), source)


def protocol_views(run: Run, protocol: EvaluationProtocol, device: str | torch.device) -> Views:
    return ours_views(run) if protocol.name == OURS.name else reference_views(run, device)


def load_images(paths: Sequence[Path]) -> list[torch.Tensor]:
    """PNG files → [3, H, W] float tensors in [0, 1] (alpha dropped, grey expanded)."""
    import imageio.v3 as iio
    import numpy as np

    images = []
    for p in paths:
        array = np.asarray(iio.imread(p))
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        scale = 65535.0 if array.dtype == np.uint16 else 255.0
        images.append(torch.from_numpy(array[..., :3].astype(np.float32) / scale).permute(2, 0, 1))
    return images


# ---------------------------------------------------------------------------------------------
# computing


def _summary(values: torch.Tensor) -> dict[str, Any]:
    return {"mean": float(values.mean()), "per_view": [round(float(v), 6) for v in values]}


@dataclass
class Evaluator:
    """The metrics to compute, the models (loaded on first use) and R-Precision's candidate prompts."""

    metrics: Sequence[str]
    candidates: Sequence[str]
    clip_b32: str = cm.CLIP_B32
    clip_b16: str = cm.CLIP_B16
    hpsv2_checkpoint: str | None = None
    hpsv2_tokenizer: str = cm.CLIP_B32
    device: str | torch.device = "cpu"
    image_reward: str | None = None  # a local folder / ImageReward.pt; None: the THUDM/ImageReward hub repo
    image_reward_tokenizer: str = ir.BLIP_TOKENIZER
    protocol: str = OURS.name  # a name (see protocol.PROTOCOLS), so settings holding it stay plain data
    _models: dict[str, Any] = field(default_factory=dict, repr=False)
    _texts: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        get_protocol(self.protocol)  # an unknown name fails here, before any model loads

    @property
    def rules(self) -> EvaluationProtocol:
        return get_protocol(self.protocol)

    def check_available(self) -> None:
        """Fail before any model loads for a metric whose local model path does not exist (a typo would
        otherwise surface only after the other metrics' models have loaded)."""
        local = {"hpsv2": (self.hpsv2_checkpoint, "--hpsv2"), "image_reward": (self.image_reward, ir.FLAG)}
        for metric, (path, flag) in local.items():
            if metric in self.metrics and path is not None and not Path(path).expanduser().exists():
                raise cm.load_error(metric, path, "no such file or folder", flag)

    def model(self, which: str) -> Any:
        loaders: dict[str, Callable[[], Any]] = {
            "b32": lambda: cm.ClipScorer.load(self.clip_b32, "CLIP score / R-Precision / Janus (ViT-B/32)",
                                              "--clip-b32", self.device),
            "b16": lambda: cm.ClipScorer.load(self.clip_b16, "CLIP-IQA (ViT-B/16)", "--clip-b16", self.device),
            "hps": lambda: cm.load_hpsv2(self.hpsv2_checkpoint, self.hpsv2_tokenizer, self.device),
            "ir": lambda: ir.load_image_reward(self.image_reward, self.image_reward_tokenizer, self.device),
        }
        if which not in self._models:
            self._models[which] = loaders[which]()
        return self._models[which]

    def texts(self, which: str, texts: Sequence[str]) -> torch.Tensor:
        """Text embeddings, cached: the candidate prompts are shared by every run."""
        missing_texts = [t for t in texts if (which, t) not in self._texts]
        if missing_texts:
            for t, e in zip(missing_texts, self.model(which).embed_texts(missing_texts)):
                self._texts[(which, t)] = e
        return torch.stack([self._texts[(which, t)] for t in texts])

    def evaluate(self, run: Run, views: Views) -> dict[str, Any]:
        if not views.images:
            return {}
        batch = torch.stack(views.images)
        out: dict[str, Any] = {}
        want = set(self.metrics)
        if want & {"clip_score", "r_precision", "janus"}:
            out.update(self._b32_metrics(run, views, batch, want))
        if "clip_iqa" in want:
            out["clip_iqa"] = self._iqa(batch)
        if "hpsv2" in want:
            scorer = self.model("hps")
            values = cm.clip_score(scorer.embed_images(batch), self.texts("hps", [run.prompt])[0])
            out["hpsv2"] = {**_summary(values), "model": scorer.name}
        if "image_reward" in want:
            scorer = self.model("ir")
            out["image_reward"] = {**_summary(scorer.score(batch, run.prompt)), "model": scorer.name}
        return out

    def _b32_metrics(self, run: Run, views: Views, batch: torch.Tensor, want: set[str]) -> dict[str, Any]:
        embeds = self.model("b32").embed_images(batch)
        out: dict[str, Any] = {}
        if "clip_score" in want:
            values = cm.clip_score(embeds, self.texts("b32", [run.prompt])[0])
            out["clip_score"] = {**_summary(values), "model": self.clip_b32}
        if "r_precision" in want:
            keys = [prompt_key(p) for p in self.candidates]
            if prompt_key(run.prompt) not in keys:
                raise RunError(f"{run.path}: its prompt {run.prompt!r} is not among R-Precision's candidates")
            sim = cm.cosine_matrix(embeds, self.texts("b32", self.candidates))
            hits = cm.r_precision(sim, keys.index(prompt_key(run.prompt)), ties=self.rules.r_precision_ties)
            out["r_precision"] = {**_summary(hits), "candidates": len(self.candidates), "model": self.clip_b32}
        if "janus" in want:
            out["janus"] = self._janus(views, embeds)
        return out

    def _janus(self, views: Views, embeds: torch.Tensor) -> dict[str, Any]:
        if views.janus is None:
            return {"value": None, "reason": "fewer than two views scored", "model": self.clip_b32}
        front, back = views.janus
        index = {view: i for i, view in enumerate(views.ids)}
        if front not in index or back not in index or back == front:
            return {"value": None, "reason": f"views {front} and {back} are not both rendered", "model": self.clip_b32}
        value = cm.janus_score(embeds[index[front]], embeds[index[back]])
        return {"value": value, "front_view": front, "back_view": back, "model": self.clip_b32}

    def _iqa(self, batch: torch.Tensor) -> dict[str, Any]:
        anchors = [text for pair in cm.IQA_PROMPTS.values() for text in pair]
        probs = cm.clip_iqa(self.model("b16").embed_images(batch), self.texts("b16", anchors))
        result: dict[str, Any] = {name: _summary(probs[:, i]) for i, name in enumerate(cm.IQA_PROMPTS)}
        return {**result, "model": self.clip_b16, "logit_scale": cm.IQA_LOGIT_SCALE}


def evaluate_run(path: str | Path, evaluator: Evaluator, force: bool = False, write: bool = True) -> dict[str, Any]:
    """Evaluate one run directory under ``evaluator.protocol``; writes the protocol's metrics file
    into it (merged with earlier metrics of that file) unless the run is missing."""
    protocol = evaluator.rules
    run = read_run(path, force)
    if run is None:
        return {"run": str(path), "missing": True, "protocol": protocol.name, "divergence": missing().to_dict()}
    views = protocol_views(run, protocol, evaluator.device)
    divergence: Divergence = check_divergence(views.images)  # on the views the protocol scores
    result = {"run": str(run.path), "prompt": run.prompt, "protocol": protocol.name, "views": len(views.images),
              "expected_views": views.expected, "scored_views": views.ids, "renders": views.source,
              "run_mvsdi_version": run.version, "mvsdi_version": mvsdi.__version__,
              "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "divergence": divergence.to_dict(),
              "metrics": evaluator.evaluate(run, views)}
    if write:
        write_metrics(run.path, result, protocol.metrics_file)
        from mvsdi.evaluate.convergence import write_convergence  # here: that module imports this one
        write_convergence(run, evaluator)  # RUN/convergence.json and .png (docs/benchmark.md)
    return result


def write_metrics(path: Path, result: dict[str, Any], name: str = METRICS_FILE) -> None:
    """Atomically write the metrics file ``name`` (the protocol's); metrics computed earlier into the
    same file and not recomputed now are kept."""
    target = path / name
    try:
        previous = json.loads(target.read_text()).get("metrics", {})
    except (OSError, ValueError, AttributeError):
        previous = {}
    atomic_write_json(target, {**result, "metrics": {**previous, **result["metrics"]}})
