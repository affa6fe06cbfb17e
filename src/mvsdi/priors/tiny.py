"""Stable-Diffusion-shaped stacks with random weights, written to disk in diffusers layout.

No machine of this project reaches a model hub, yet the loading code of ``StableDiffusionPrior``
must be exercised for real. These stacks are built in code and saved with ``save_pretrained``, so
``StableDiffusionPrior(str(folder))`` goes through exactly the path a downloaded model takes.

- ``"tiny"``: a few tens of thousands of parameters, 32² images / 16² latents, for CPU tests.
- ``"sd21-base"``: the module shapes of SD-2.1-base (≈1.3 B parameters, saved in float16) for GPU
  speed and memory benchmarks; its outputs mean nothing.

Both use a character-level CLIP tokenizer (no BPE merges): real vocabularies cannot be fetched
here, and for random weights only the id range matters.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from pathlib import Path

import diffusers
import torch
import transformers

MARKER = "mvsdi_stack.json"
FORMAT = 1  # bump when the layout written here changes, so old caches are rebuilt
SHAPES = ("tiny", "sd21-base")
MAX_TOKENS = 77  # CLIP's context length in SD

# SD-2.1-base's scheduler (its repo ships it as a PNDM config with these betas)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def cache_root() -> Path:
    """Where mvsdi caches what it builds (random stacks, testbed references): $MVSDI_CACHE or ~/.cache/mvsdi."""
    return Path(os.environ.get("MVSDI_CACHE", "~/.cache/mvsdi")).expanduser()


def character_vocab() -> dict[str, int]:
    """Start/end tokens, then each lowercase letter, digit and punctuation mark alone and word-final."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars]
    return {token: i for i, token in enumerate(tokens)}


def _tokenizer() -> transformers.CLIPTokenizer:
    # transformers 5 ignores vocab_file=/merges_file=; the in-memory vocab= / merges= form works
    return transformers.CLIPTokenizer(vocab=character_vocab(), merges=[], model_max_length=MAX_TOKENS)


def _unet(shape: str) -> diffusers.UNet2DConditionModel:
    if shape == "tiny":
        return diffusers.UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16, norm_num_groups=4, attention_head_dim=(2, 4), use_linear_projection=True)
    # SD-2.1-base: attention_head_dim is (as in diffusers' naming) the number of heads per level
    return diffusers.UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
        norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0)


def _vae(shape: str) -> diffusers.AutoencoderKL:
    tiny = shape == "tiny"
    channels = (8, 16) if tiny else (128, 256, 512, 512)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=1 if tiny else 2, norm_num_groups=4 if tiny else 32, act_fn="silu",
        sample_size=32 if tiny else 512, scaling_factor=0.18215)


def _text_encoder(shape: str, vocab: dict[str, int]) -> transformers.CLIPTextModel:
    # bos/eos/pad must be the ids of the tokenizer written next to it
    ids = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
               pad_token_id=vocab["<|endoftext|>"])
    if shape == "tiny":
        config = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=2, num_attention_heads=2,
                                             max_position_embeddings=MAX_TOKENS, projection_dim=16, hidden_act="gelu",
                                             **ids)
    else:  # OpenCLIP ViT-H text tower minus its last layer, as SD-2 uses it
        config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                                             num_hidden_layers=23, num_attention_heads=16,
                                             max_position_embeddings=MAX_TOKENS, projection_dim=512, hidden_act="gelu",
                                             **ids)
    return transformers.CLIPTextModel(config)


def _marker(shape: str, seed: int) -> dict:
    return {"shape": shape, "seed": seed, "format": FORMAT, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def _is_complete(folder: Path, shape: str, seed: int) -> bool:
    try:
        found = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (found.get("shape"), found.get("seed"), found.get("format")) == (shape, seed, FORMAT)


def _write(folder: Path, shape: str, seed: int) -> None:
    vocab = character_vocab()
    # a private RNG: building a stack must not shift the caller's random stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = {"unet": _unet(shape), "vae": _vae(shape), "text_encoder": _text_encoder(shape, vocab)}
    for name, module in modules.items():
        if shape == "sd21-base":
            module.half()  # halves 5 GB of random weights on disk; the prior casts on load anyway
        module.save_pretrained(folder / name)
    _tokenizer().save_pretrained(folder / "tokenizer")
    diffusers.DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(_model_index(), indent=2))
    # written last: its presence means every file above is complete
    (folder / MARKER).write_text(json.dumps(_marker(shape, seed), indent=2))


def _model_index() -> dict:
    return {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
            "feature_extractor": [None, None], "requires_safety_checker": False}


def write_random_stable_diffusion(folder: Path | str, shape: str = "tiny", seed: int = 0) -> Path:
    """Build a random-weight SD stack of ``shape`` in ``folder`` (diffusers layout); reuse a complete one."""
    if shape not in SHAPES:
        raise ValueError(f"unknown stack shape {shape!r}; choose one of {SHAPES}")
    folder = Path(folder).expanduser()
    if _is_complete(folder, shape, seed):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and move it in whole, so a crash or a concurrent builder never
    # leaves a half-written stack where a reader would load it
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        _write(staging, shape, seed)
        if _is_complete(folder, shape, seed):  # another process finished first
            return folder
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
