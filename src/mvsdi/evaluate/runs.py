"""Evaluating run directories: read and validate a run, compute its metrics, write ``metrics.json``.

Every metric is computed per evaluation view and then averaged over the views of the run (one
prompt); the per-view values are kept in ``metrics.json`` so other aggregations stay possible.
Which views are scored, and where the results go, is the evaluation protocol's (``protocol.py``):
``ours`` by default, ``reference`` for the MV-SDI reference's (``metrics_reference.json``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import mvsdi
from mvsdi.atomic_files import atomic_write_json
from mvsdi.evaluate import clip_metrics as cm
from mvsdi.evaluate import image_reward as ir
from mvsdi.evaluate.convergence import write_convergence
from mvsdi.evaluate.divergence import Divergence, check_divergence, missing
from mvsdi.evaluate.protocol import OURS, EvaluationProtocol, get_protocol, janus_positions
from mvsdi.evaluate.reference_renders import find_or_render
from mvsdi.evaluate.run_folder import Run, RunError, load_images, prompt_key, read_run, view_index
from mvsdi.rundir import RENDERS

METRICS_FILE = OURS.metrics_file  # the default protocol's; the reference's is metrics_reference.json
KNOWN_METRICS = ("clip_score", "r_precision", "clip_iqa", "janus", "divergence", "hpsv2", "image_reward")
# hpsv2 (ViT-H/14, ≈1 B parameters) and image_reward (BLIP ViT-L + BERT, ≈0.45 B) are big: only when asked for
DEFAULT_METRICS = ("clip_score", "r_precision", "clip_iqa", "janus", "divergence")
# ---------------------------------------------------------------------------------------------
# inputs: metric names and prompt lists


def parse_metrics(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in KNOWN_METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {unknown or [text]}; known metrics: {', '.join(KNOWN_METRICS)}")
    return names


@dataclass
class Views:
    """The views of a run that a protocol scores."""

    images: list[torch.Tensor]
    ids: list[int]  # per image: its view index (ours) or turntable index (reference)
    janus: tuple[int, int] | None  # the view ids of (front, back); None: the protocol has no pair
    expected: int  # how many views the protocol scores
    source: str  # where the images came from, for metrics.json


def ours_views(run: Run) -> Views:
    """The run's own evaluation renders; Janus pairs view 0 with view V/2 (V = eval_views)."""
    return Views(load_images(run.renders), [view_index(p) for p in run.renders], (0, run.expected_views // 2),
                 run.expected_views, f"{RENDERS}/")


def reference_views(run: Run, device: str | torch.device) -> Views:
    """The reference's 50 scored turntable views (rendered from the checkpoint when the run lacks
    them); Janus pairs the first and the middle one of the 50."""
    found, source = find_or_render(run.path, device)
    ids = [i for i, _ in found]
    pair = janus_positions(len(ids))
    return Views(load_images([p for _, p in found]), ids, None if pair is None else (ids[pair[0]], ids[pair[1]]),
                 len(ids), source)


def protocol_views(run: Run, protocol: EvaluationProtocol, device: str | torch.device) -> Views:
    return ours_views(run) if protocol.name == OURS.name else reference_views(run, device)


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
