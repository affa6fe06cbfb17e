"""The ideal denoiser: the exact optimal denoiser of the testbed's reference renders.

For an empirical image set {x_i} and x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε, the minimum-MSE estimate of
x_0 is the posterior mean over the set,

    x̂₀(x_t) = Σ_i softmax_i( −‖x_t − √ᾱ_t x_i‖² / (2(1−ᾱ_t)) ) x_i,
    ε̂       = (x_t − √ᾱ_t x̂₀) / √(1−ᾱ_t).

``IdealDenoiserPrior`` serves that through the ``DiffusionPrior`` protocol in *pixel space*:
"latents" are the images themselves, [N, 3, s, s] in [−1, 1]. The set is M renders per scene from
random training cameras, so, like a text-to-image model, the prior knows what each object looks
like but not from where. Texts select a scene ("mug"; view suffixes such as ", back view" are
ignored); the empty text selects the union of all scenes, the unconditional branch of
classifier-free guidance. With ``data_sigma`` = σ_d > 0 each reference is a Gaussian N(x_i, σ_d² I)
instead of a point, and the denoiser is that mixture's exact posterior mean:
x̂₀ = Σ_i w_i (x_i + σ_d² a/(a²σ_d² + s²)(x_t − a x_i)), w_i ∝ N(x_t; a x_i, (a²σ_d² + s²) I),
a = √ᾱ_t, s² = 1 − ᾱ_t (default 0: the set itself). The noise schedule is SD-2.1's, so SDS/SDI and their t schedules run
unchanged.

Reference images are cached in ``$MVSDI_CACHE/testbed`` (default ``~/.cache/mvsdi/testbed``), one
file per (scene, M, size, seed), holding uint8 images, the metadata they were made with and a
sha256 of the image bytes. A file whose metadata or checksum does not match, or that cannot be
read, is reported with ``warnings.warn`` (path and reason) and rebuilt. Images are quantised to
uint8 whether fresh or loaded, so a prior is identical either way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from torch import Tensor

from mvsdi.atomic_files import atomic_torch_save
from mvsdi.cameras import Cameras, CameraRanges, sample_views
from mvsdi.priors.base import NetworkCounters
from mvsdi.priors.tiny import SCHEDULER_CONFIG, cache_root
from mvsdi.testbed import scenes as sc

# bump when the cache layout or the meaning of its contents changes (2: per-view camera draws and jitter;
# 3: the references are drawn from TESTBED_CAMERAS, and the version is part of the file name, so
# code of another version never rebuilds, and so overwrites, this version's files)
FORMAT_VERSION = 3
SIZE_RANGE = (8, 256)
MAX_REFERENCES = 16384  # per scene; beyond this the softmax over the set is hours of CPU
NEGLIGIBLE_WEIGHT = 1e-30  # posterior weights below this are left out of the posterior mean
CHUNK_BYTES = 512 * 2 ** 20  # references are used in float64 chunks of at most this many bytes
_VIEW_SUFFIX = re.compile(r",\s*(front|side|back|overhead) view$")


# The testbed's camera distribution: the references are drawn from it, and so are the study's training
# views (``study.cell_config``). The distillation's optimum is the truth only if the truth is (near)
# a fixed point of the prior: its own render at a training camera must lie close to some reference,
# or the denoiser (at low noise: the nearest reference) pulls it to a view of another framing.
# Measured (mug, 32², 32–64 training cameras, mean squared distance to the nearest reference
# over the render's squared norm; issue 15): with threestudio's jitter
# (off-centre, tilted views) in training but not in the references 0.87 at 64 references, 0.82 at
# 256; without the jitter 0.27 / 0.19 / 0.12 at 64 / 256 / 1,024; with the fovy fixed too 0.14 at
# 256; with distance and fovy fixed 0.12 / 0.06 / 0.03. So no jitter, fovy fixed at the middle of
# the reference's range (it drove most of the apparent size: tan(20°)..tan(35°), ×1.9), and the
# distance and elevation still drawn per view (the K-view samplers' views must not be copies at the
# symmetric initial blob, docs/testbed.md).
TESTBED_CAMERAS = dataclasses.replace(CameraRanges().unperturbed(), fovy_deg=(55.0, 55.0))


def sd21_alphas_cumprod() -> Tensor:
    """ᾱ_t of SD-2.1's schedule, from diffusers with the config the SD stacks use, so the testbed
    and Stable Diffusion share one noise schedule."""
    return DDIMScheduler(**SCHEDULER_CONFIG).alphas_cumprod.float()


def default_cache_dir() -> Path:
    return cache_root() / "testbed"


# ------------------------------------------------------------------------------------------------
# reference images and their cache


def renderer_settings() -> dict:
    """What the reference images depend on besides scene and cameras (part of the cache key)."""
    return {"method": "sphere_trace", "shading": "albedo", "background": sc.BACKGROUND, "bound": sc.TRUTH_BOUND,
            "max_steps": sc.TRACE_STEPS, "hit_eps": sc.HIT_EPS, "graze_eps": sc.GRAZE_EPS, "storage": "uint8"}


def reference_metadata(scene: sc.Scene, count: int, size: int, seed: int, ranges: CameraRanges) -> dict:
    return {"format": FORMAT_VERSION, "scene": scene.name, "scene_version": scene.version, "count": count,
            "size": size, "seed": seed, "sampler": "random", "ranges": dataclasses.asdict(ranges),
            "renderer": renderer_settings()}


def _canonical(meta: dict) -> str:
    # JSON round trip: tuples become lists, so a loaded and a fresh metadata compare equal
    return json.dumps(meta, sort_keys=True)


def _sha256(images: Tensor) -> str:
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()


def reference_cameras(count: int, seed: int = 0, ranges: CameraRanges = TESTBED_CAMERAS) -> Cameras:
    """The cameras of the ``count`` reference renders: random training cameras of ``ranges``, without
    their position, centre and up jitter. The references play the images a text-to-image model
    makes, objects centred and upright; the jitter is the renderer's augmentation, not part of what
    the prior knows (and off-centre references would make the view metrics match by position
    instead of by shape)."""
    return sample_views("random", count, torch.Generator().manual_seed(seed), ranges.unperturbed())


def render_references(scene: sc.Scene, count: int, size: int, seed: int, ranges: CameraRanges) -> Tensor:
    """[count, 3, size, size] uint8 truth renders from ``reference_cameras``."""
    images = sc.render_truth(scene, reference_cameras(count, seed, ranges), size)
    return (images * 255.0).round().clamp(0, 255).to(torch.uint8)


def _read_cache(path: Path, meta: dict) -> Tensor | None:
    """The cached images at ``path`` if they are what ``meta`` asks for; otherwise warn and None."""
    if not path.exists():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        problem = _problem(blob, meta)
    except Exception as error:  # noqa: BLE001 - any unreadable file is a corrupt cache
        problem = f"unreadable ({type(error).__name__}: {error})"
    if problem is None:
        return blob["images"]
    warnings.warn(f"testbed cache {path} is stale or corrupt: {problem}; rebuilding it", stacklevel=3)
    return None


def _problem(blob: object, meta: dict) -> str | None:
    if not isinstance(blob, dict) or not {"meta", "sha256", "images"} <= blob.keys():
        return "not a testbed cache file"
    if _canonical(blob["meta"]) != _canonical(meta):
        cached, wanted = json.loads(_canonical(blob["meta"])), json.loads(_canonical(meta))
        keys = sorted(k for k in set(cached) | set(wanted) if cached.get(k) != wanted.get(k))
        return "metadata differs in " + ", ".join(
            f"{k} (cached {cached.get(k)!r}, wanted {wanted.get(k)!r})" for k in keys)
    images = blob["images"]
    expected = (meta["count"], 3, meta["size"], meta["size"])
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or tuple(images.shape) != expected:
        return f"images are not uint8 of shape {expected}"
    if _sha256(images) != blob["sha256"]:
        return "checksum mismatch"
    return None


def _write_cache(path: Path, meta: dict, images: Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(path, {"meta": meta, "sha256": _sha256(images), "images": images})


def cached_references(scene: sc.Scene, count: int, size: int, seed: int = 0, ranges: CameraRanges = TESTBED_CAMERAS,
                      cache_dir: Path | None = None, use_cache: bool = True) -> Tensor:
    """[count, 3, size, size] uint8 reference renders of ``scene``, from the cache or rendered."""
    meta = reference_metadata(scene, count, size, seed, ranges)
    path = (cache_dir or default_cache_dir()) / f"{scene.name}-m{count}-s{size}-seed{seed}-v{FORMAT_VERSION}.pt"
    images = _read_cache(path, meta) if use_cache else None
    if images is None:
        images = render_references(scene, count, size, seed, ranges)
        if use_cache:
            _write_cache(path, meta, images)
    return images


def _check_settings(count: int, size: int) -> None:
    lo, hi = SIZE_RANGE
    if isinstance(size, bool) or not isinstance(size, int) or not lo <= size <= hi:
        raise ValueError(f"image_size must be an integer in [{lo}, {hi}], got {size!r}")
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_REFERENCES:
        raise ValueError(f"the number of reference images per scene must be an integer in [1, {MAX_REFERENCES}], "
                         f"got {count!r}")


# ------------------------------------------------------------------------------------------------
# the prior


class IdealDenoiserPrior:
    """The exact denoiser of the scenes' reference renders; implements ``DiffusionPrior``.

    ``IdealDenoiserPrior()`` covers every registered scene with 256 references each at 64²;
    ``IdealDenoiserPrior.from_images({...})`` wraps any image sets (e.g. hand-made ones in tests).
    """

    def __init__(self, scenes: Sequence[str] | None = None, n_references: int = 256, image_size: int = 64,
                 seed: int = 0, device: str | torch.device = "cpu", ranges: CameraRanges = TESTBED_CAMERAS,
                 cache_dir: Path | str | None = None, use_cache: bool = True, data_sigma: float = 0.0) -> None:
        _check_settings(n_references, image_size)
        names = list(scenes) if scenes is not None else list(sc.SCENES)
        if not names:
            raise ValueError("the ideal prior needs at least one scene")
        root = Path(cache_dir) if cache_dir is not None else None
        images = {name: cached_references(sc.get_scene(name), n_references, image_size, seed, ranges, root, use_cache)
                  for name in names}
        self._setup({name: im.float() / 255.0 for name, im in images.items()}, device, data_sigma)

    @classmethod
    def from_images(cls, references: Mapping[str, Tensor], device: str | torch.device = "cpu",
                    data_sigma: float = 0.0) -> "IdealDenoiserPrior":
        """A prior over given image sets: name → [M, 3, s, s] in [0, 1], one size for all."""
        prior = cls.__new__(cls)
        prior._setup(references, device, data_sigma)
        return prior

    def _setup(self, references: Mapping[str, Tensor], device: str | torch.device, data_sigma: float = 0.0) -> None:
        if not (isinstance(data_sigma, (int, float)) and not isinstance(data_sigma, bool) and 0.0 <= data_sigma < 10.0):
            raise ValueError(f"data_sigma must be a number in [0, 10) (model space), got {data_sigma!r}")
        self.data_sigma = float(data_sigma)
        if not references:
            raise ValueError("the ideal prior needs at least one image set")
        shapes = {tuple(im.shape[1:]) for im in references.values()}
        if len(shapes) != 1 or any(im.ndim != 4 or im.shape[0] < 1 or im.shape[1] != 3 or im.shape[2] != im.shape[3]
                                   for im in references.values()):
            raise ValueError(f"reference sets must be non-empty [M, 3, s, s] tensors of one size, got shapes {shapes}")
        size = shapes.pop()[-1]
        _check_settings(1, size)
        self.device = torch.device(device)
        self.image_size = size
        self.num_train_timesteps = 1000
        self.alphas_cumprod = sd21_alphas_cumprod().to(self.device)
        # the published float32 values, widened: callers form x_t and x̂₀ with exactly these
        self._alphas64 = self.alphas_cumprod.double()
        self.counters = NetworkCounters()
        self.scene_names = list(references)
        self._index = {name.lower(): i for i, name in enumerate(self.scene_names)}  # texts are matched lowercased
        for name in self.scene_names:  # descriptions of registered scenes work as prompts too
            if name in sc.SCENES:
                self._index.setdefault(sc.SCENES[name].description.lower(), self._index[name.lower()])
        images = torch.cat([references[n].float() for n in self.scene_names]).to(self.device)
        self._images = images.clamp(0.0, 1.0)  # [M_all, 3, s, s] in [0, 1]
        self._labels = torch.cat([torch.full((len(references[n]),), i, dtype=torch.long)
                                  for i, n in enumerate(self.scene_names)]).to(self.device)
        flat = self._images.flatten(1).double() * 2.0 - 1.0  # model space [-1, 1]
        self._sqnorm = flat.square().sum(1)  # ‖x_i‖², float64
        self._rows = max(1, CHUNK_BYTES // (flat.shape[1] * 8))
        # a small set stays in memory in float64; a big one is widened chunk by chunk at each call
        self._flat64 = flat if self._rows >= len(flat) else None

    # -- references ------------------------------------------------------------------------------

    def references(self, scene: str) -> Tensor:
        """[M, 3, s, s] in [0, 1]: the reference images of ``scene``."""
        return self._images[self._labels == self._scene_id(scene)]

    def union_references(self) -> tuple[Tensor, Tensor]:
        """All reference images [M_all, 3, s, s] in [0, 1] and their scene index [M_all]."""
        return self._images, self._labels

    def _scene_id(self, scene: str) -> int:
        if scene not in self.scene_names:
            raise ValueError(f"unknown scene {scene!r}; this prior knows: {', '.join(self.scene_names)}")
        return self.scene_names.index(scene)

    # -- DiffusionPrior --------------------------------------------------------------------------

    def encode_images(self, images: Tensor) -> Tensor:
        """[N, 3, H, W] in [0, 1] → [N, 3, s, s] in [−1, 1]; differentiable (antialiased resize)."""
        size = self.image_size
        x = images.to(self.device, torch.get_default_dtype())  # float32, or float64 for reference computations
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return x * 2.0 - 1.0

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        return ((latents.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def scene_index(self, text: str) -> int:
        """−1 for the empty text (the union), else the index of the scene the text names."""
        key = _VIEW_SUFFIX.sub("", text.strip().lower()).strip()
        if key == "":
            return -1
        if key not in self._index:
            raise ValueError(f"the ideal prior only knows its scenes: {text!r} is none of "
                             f"{', '.join(self.scene_names)} (or '' for the unconditional union)")
        return self._index[key]

    def embed_texts(self, texts: list[str]) -> Tensor:
        """LongTensor [N]: each text's scene index, −1 for the empty (unconditional) text."""
        return torch.tensor([self.scene_index(t) for t in texts], dtype=torch.long, device=self.device)

    @torch.no_grad()
    def predict_noise(self, latents_t: Tensor, t: Tensor, embeddings: Tensor) -> Tensor:
        """ε̂ of the ideal denoiser for the batch: one "network call" (counters +1 call, +N images)."""
        self.counters.calls += 1
        self.counters.images += latents_t.shape[0]
        alpha = self._alpha(t, latents_t.shape[0])
        x = latents_t.to(self.device, torch.float64).flatten(1)
        x0 = self._posterior_mean(x, alpha, self._labels_of(embeddings, latents_t.shape[0]))
        eps = (x - alpha.sqrt()[:, None] * x0) / (1.0 - alpha).sqrt()[:, None]
        return eps.to(latents_t.dtype).view(latents_t.shape)

    # -- the denoiser itself ---------------------------------------------------------------------

    @torch.no_grad()
    def denoise(self, latents_t: Tensor, t: Tensor, embeddings: Tensor) -> Tensor:
        """x̂₀ in model space (no counters: a diagnostic, not a network call)."""
        n = latents_t.shape[0]
        x = latents_t.to(self.device, torch.float64).flatten(1)
        x0 = self._posterior_mean(x, self._alpha(t, n), self._labels_of(embeddings, n))
        return x0.to(latents_t.dtype).view(latents_t.shape)

    @torch.no_grad()
    def posterior_weights(self, latents_t: Tensor, t: Tensor, embeddings: Tensor) -> Tensor:
        """[N, M_all] float64: the softmax weight of every reference (0 outside the selected scene)."""
        n = latents_t.shape[0]
        x = latents_t.to(self.device, torch.float64).flatten(1)
        return torch.softmax(self._logits(x, self._alpha(t, n), self._labels_of(embeddings, n)), dim=1)

    def _alpha(self, t: Tensor, n: int) -> Tensor:
        t = torch.as_tensor(t, device=self.device).long().reshape(-1).expand(n)
        if (t < 0).any() or (t >= self.num_train_timesteps).any():
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}]")
        return self._alphas64[t]

    def _labels_of(self, embeddings: Tensor, n: int) -> Tensor:
        """Scene index per sample from embeddings of ``embed_texts`` (prompt code may cast them to float)."""
        e = torch.as_tensor(embeddings, device=self.device).reshape(n, -1)
        if e.shape[1] != 1:
            raise ValueError(f"expected one scene index per sample, got embeddings of shape {tuple(embeddings.shape)}")
        labels = e[:, 0].double().round()
        off_grid = (e[:, 0].double() - labels).abs() > 1e-3
        if off_grid.any() or (labels < -1).any() or (labels >= len(self.scene_names)).any():
            raise ValueError("embeddings must be scene indices made by embed_texts (−1 = unconditional)")
        return labels.long()

    def _chunks(self) -> Iterator[tuple[slice, Tensor]]:
        if self._flat64 is not None:
            yield slice(0, len(self._flat64)), self._flat64
            return
        for start in range(0, len(self._images), self._rows):
            rows = slice(start, start + self._rows)
            yield rows, self._images[rows].flatten(1).double() * 2.0 - 1.0

    def _logits(self, x: Tensor, alpha: Tensor, labels: Tensor) -> Tensor:
        """[N, M_all]: −‖x − √ᾱ x_i‖² / (2(1−ᾱ)) up to a per-sample constant (‖x‖² cancels in the
        softmax), in float64 so that small-noise logits (divided by 1−ᾱ ≈ 1e-3) keep their digits;
        references outside the sample's scene get −inf."""
        a = alpha.sqrt()[:, None]
        var = alpha[:, None] * self.data_sigma ** 2 + (1.0 - alpha)[:, None]  # a²σ_d² + s²
        dots = torch.cat([x @ refs.T for _, refs in self._chunks()], dim=1)
        logits = (2.0 * a * dots - a * a * self._sqnorm[None, :]) / (2.0 * var)
        allowed = (labels[:, None] < 0) | (labels[:, None] == self._labels[None, :])
        return logits.masked_fill(~allowed, float("-inf"))

    def _posterior_mean(self, x: Tensor, alpha: Tensor, labels: Tensor) -> Tensor:
        weights = torch.softmax(self._logits(x, alpha, labels), dim=1)  # log-sum-exp inside: stable
        out = torch.zeros_like(x)
        for rows, refs in self._chunks():
            chunk = weights[:, rows]
            # At small noise nearly all weight sits on a few references. References whose weight is
            # below NEGLIGIBLE_WEIGHT in every row change the mean by less than M·1e-30 of its scale,
            # far below float64's rounding, so they are left out of the product (a memory-bound
            # stream of every reference otherwise).
            kept = (chunk > NEGLIGIBLE_WEIGHT).any(0).nonzero().squeeze(1)
            if len(kept) < 0.5 * chunk.shape[1]:
                out += chunk[:, kept] @ refs[kept]
            else:
                out += chunk @ refs
        if self.data_sigma > 0.0:  # each component's own posterior mean: μ_i + k (x_t − a μ_i), k shared
            a = alpha.sqrt()[:, None]
            gain = self.data_sigma ** 2 * a / (alpha[:, None] * self.data_sigma ** 2 + (1.0 - alpha)[:, None])
            out = out + gain * (x - a * out)
        return out
