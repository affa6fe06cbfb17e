"""CLIP-based metrics: CLIP score, CLIP R-Precision, CLIP-IQA, the Janus score, and HPSv2.1.

The maths lives in short pure functions of embeddings (``cosine_matrix``, ``r_precision``,
``clip_iqa``, ``janus_score``) so it can be checked on constructed vectors with known answers.
``ClipScorer`` turns images and texts into embeddings with a ``transformers.CLIPModel``; the image
preprocessing is done here in torch (resize, centre crop, normalise) rather than by
``CLIPImageProcessor``, whose fast variant wants torchvision, which cannot be installed beside this
torch (docs/design.md, "The dependency stack").

HPSv2.1 is an OpenCLIP ViT-H/14 fine-tune. Its published checkpoint is an OpenCLIP state dict, which
``openclip_to_transformers`` renames and splits into ``CLIPModel``'s layout, so the score runs on
transformers alone (the official ``hpsv2`` package breaks this install).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import transformers
from transformers.utils import cached_file

CLIP_B32 = "openai/clip-vit-base-patch32"
CLIP_B16 = "openai/clip-vit-base-patch16"
# OpenAI CLIP's normalisation; used when a model folder has no preprocessor_config.json
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# CLIP-IQA antonym pairs (positive first), as in the CLIP-IQA paper and torchmetrics
IQA_PROMPTS: dict[str, tuple[str, str]] = {
    "quality": ("Good photo.", "Bad photo."),
    "sharpness": ("Sharp photo.", "Blurry photo."),
    "real": ("Real photo.", "Abstract photo."),
}
# CLIP-IQA scales cosines by 100 before the pairwise softmax: OpenAI CLIP's learned temperature
# (exp(logit_scale), clamped at 100 in training); a constant, so the score does not depend on
# which checkpoint's stored logit_scale is loaded.
IQA_LOGIT_SCALE = 100.0

HPS_REPO = "xswu/HPSv2"
HPS_FILE = "HPS_v2.1_compressed.pt"
# OpenCLIP ViT-H-14: vision width 1280 with 80-wide heads (16), text width 1024 with 64-wide heads (16), GELU
VIT_H14_HEADS = {"vision_heads": 16, "text_heads": 16, "hidden_act": "gelu"}


class MetricLoadError(RuntimeError):
    """A metric's model could not be loaded; the message says which, from where, why, and how to fix it."""


def load_error(metric: str, source: str, reason: str, flag: str,
               local: str = "a folder saved by save_pretrained, or a hub snapshot") -> MetricLoadError:
    return MetricLoadError(
        f"could not load the model for {metric} from {source!r}: {reason}\n"
        f"Fix: pass a local copy with {flag} PATH ({local}), or download it from the hub once with network "
        "access; with HF_HUB_OFFLINE=1 a hub file loads only from the local Hugging Face cache.")


# ---------------------------------------------------------------------------------------------
# the maths, on embeddings


def normalise(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, D] x [M, D] → [N, M] cosine similarities."""
    return normalise(a) @ normalise(b).T


def clip_score(image_embeds: torch.Tensor, text_embed: torch.Tensor) -> torch.Tensor:
    """Per image, the cosine with one text embedding ([D] or [1, D]); in [-1, 1], not ×100."""
    return cosine_matrix(image_embeds, text_embed.reshape(1, -1))[:, 0]


def r_precision(similarity: torch.Tensor, target: int, ties: str = "miss") -> torch.Tensor:
    """Per image (row), 1.0 if the right text (column ``target``) is its top-1 retrieval, else 0.0.

    ``ties="miss"``: a tie with another prompt counts as a miss (a model that cannot tell them apart
    did not retrieve it). ``ties="first"``: the MV-SDI reference's ``argmax``, where a tie goes to the
    earliest candidate, so the right text also wins ties with the candidates after it.
    """
    if not 0 <= target < similarity.shape[1]:
        raise ValueError(f"target prompt index {target} outside the {similarity.shape[1]} candidates")
    if ties not in ("miss", "first"):
        raise ValueError(f"ties={ties!r}: use 'miss' or 'first'")
    right = similarity[:, target]
    before, after = similarity[:, :target], similarity[:, target + 1:]
    beats_before = (right[:, None] > before).all(dim=1)
    beats_after = (right[:, None] >= after if ties == "first" else right[:, None] > after).all(dim=1)
    return (beats_before & beats_after).float()


def clip_iqa(image_embeds: torch.Tensor, anchor_embeds: torch.Tensor,
             logit_scale: float = IQA_LOGIT_SCALE) -> torch.Tensor:
    """[N, D] images, [2P, D] anchors (positive, negative, positive, ...) → [N, P] P(positive)."""
    if anchor_embeds.shape[0] % 2:
        raise ValueError("CLIP-IQA anchors come in (positive, negative) pairs; got an odd number")
    logits = logit_scale * cosine_matrix(image_embeds, anchor_embeds)
    return logits.reshape(logits.shape[0], -1, 2).softmax(dim=-1)[..., 0]


def janus_score(front_embed: torch.Tensor, back_embed: torch.Tensor) -> float:
    """Cosine of the front and back views' image embeddings: near 1 when the back shows the front's face."""
    return float(cosine_matrix(front_embed.reshape(1, -1), back_embed.reshape(1, -1))[0, 0])


# ---------------------------------------------------------------------------------------------
# preprocessing and the scorer


def preprocess(images: torch.Tensor, resize: int, crop: int, mean: Sequence[float],
               std: Sequence[float]) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] → CLIP input: shortest side to ``resize`` (bicubic), centre ``crop``, normalise."""
    h, w = images.shape[-2:]
    scale = resize / min(h, w)
    size = (max(crop, round(h * scale)), max(crop, round(w * scale)))
    if size != (h, w):
        # antialias like PIL's resize; clamp because bicubic overshoots where PIL would saturate uint8
        images = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False,
                               antialias=True).clamp(0, 1)
    top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
    images = images[..., top:top + crop, left:left + crop]
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def _side(value: Any, default: int) -> int:
    """A size entry of preprocessor_config.json: an int, {shortest_edge}, or {height, width}."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return int(value.get("shortest_edge") or value.get("height") or default)
    return default


def _preprocessor_settings(source: str, image_size: int) -> dict[str, Any]:
    """Resize/crop/mean/std from the model's preprocessor_config.json, else OpenAI CLIP's defaults."""
    settings = {"resize": image_size, "crop": image_size, "mean": OPENAI_MEAN, "std": OPENAI_STD}
    try:
        path = cached_file(source, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    except Exception:  # noqa: BLE001 - a missing optional file means the defaults
        path = None
    if path:
        found = json.loads(Path(path).read_text())
        settings["resize"] = _side(found.get("size"), image_size)
        settings["crop"] = _side(found.get("crop_size"), image_size)
        settings["mean"] = tuple(found.get("image_mean", OPENAI_MEAN))
        settings["std"] = tuple(found.get("image_std", OPENAI_STD))
    return settings


def _check_tokenizer(tokenizer) -> None:
    # transformers 5 can return a nearly empty CLIPTokenizer under HF_HUB_OFFLINE=1 instead of raising;
    # every text would then encode alike and every metric would be meaningless.
    a, b = tokenizer(["a", "z"]).input_ids
    if len(tokenizer) < 3 or a == b:
        raise ValueError(f"the tokenizer came back empty (vocabulary of {len(tokenizer)})")


@dataclass
class ClipScorer:
    """A CLIP model as two embedding functions: images [N, 3, H, W] in [0, 1] and texts."""

    model: transformers.CLIPModel
    tokenizer: transformers.CLIPTokenizer
    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = "clip"
    batch_size: int = 16

    @classmethod
    def load(cls, source: str, metric: str, flag: str, device: str | torch.device = "cpu") -> "ClipScorer":
        """Load a CLIPModel + tokenizer from a hub id or local folder; failures become ``MetricLoadError``."""
        path = Path(source).expanduser()
        if not path.is_dir() and (source.startswith(("/", ".", "~")) or source.count("/") > 1):
            raise load_error(metric, source, "no such folder", flag)  # else hub machinery would look it up online
        source = str(path) if path.is_dir() else source
        try:
            model = transformers.CLIPModel.from_pretrained(source)
            tokenizer = transformers.CLIPTokenizer.from_pretrained(source)
            _check_tokenizer(tokenizer)
        except Exception as error:  # noqa: BLE001 - every loader failure becomes one actionable error
            raise load_error(metric, source, f"{type(error).__name__}: {error}", flag) from error
        settings = _preprocessor_settings(source, int(model.config.vision_config.image_size))
        return cls(model.eval().requires_grad_(False).to(device), tokenizer, name=source, **settings)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] → [N, D] projected image embeddings (not normalised)."""
        out = []
        for chunk in images.split(self.batch_size):
            pixels = preprocess(chunk.to(self.device), self.resize, self.crop, self.mean, self.std)
            # the vision tower's pooled output then the projection: stable across transformers versions,
            # unlike get_image_features' return type
            pooled = self.model.vision_model(pixel_values=pixels.to(self.model.dtype)).pooler_output
            out.append(self.model.visual_projection(pooled).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts → [M, D] projected text embeddings (not normalised); truncated at the context length."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                    max_length=self.model.config.text_config.max_position_embeddings,
                                    return_tensors="pt").to(self.device)
            pooled = self.model.text_model(input_ids=tokens.input_ids,
                                           attention_mask=tokens.attention_mask).pooler_output
            out.append(self.model.text_projection(pooled).float().cpu())
        return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# HPSv2.1 through transformers: OpenCLIP state dict → CLIPModel

_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_PLAIN = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: transformers' spelling
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
# OpenCLIP stores projections as x @ P ([width, embed]); nn.Linear wants P.T
_PROJECTIONS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_IGNORED = {"attn_mask"}  # a buffer some OpenCLIP versions save: the causal mask, rebuilt by transformers


def _convert_block(tower: str, layer: str, rest: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    prefix = f"{tower}.encoder.layers.{layer}."
    if rest.startswith("attn.in_proj_"):  # q, k, v packed along dim 0 (nn.MultiheadAttention's layout)
        kind = rest.rsplit("_", 1)[1]  # weight or bias
        return {f"{prefix}self_attn.{n}_proj.{kind}": t for n, t in zip("qkv", value.chunk(3, dim=0))}
    for old, new in _BLOCK_PARTS.items():
        if rest.startswith(old + "."):
            return {prefix + new + rest[len(old):]: value}
    raise KeyError(rest)


def openclip_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An OpenCLIP ViT CLIP state dict (OpenAI key layout) → ``transformers.CLIPModel`` keys.

    Unknown keys raise ``KeyError`` rather than being dropped: a silently unloaded weight would give
    a plausible-looking but wrong score.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")  # saved from DistributedDataParallel
        if key in _IGNORED:
            continue
        if key in _PLAIN:
            out[_PLAIN[key]] = value
        elif key in _PROJECTIONS:
            out[_PROJECTIONS[key]] = value.T.contiguous()
        elif match := _BLOCK.match(key):
            tower = "vision_model" if match.group(1) else "text_model"
            try:
                out.update(_convert_block(tower, match.group(2), match.group(3), value))
            except KeyError:
                raise KeyError(f"unknown OpenCLIP key {key!r}") from None
        else:
            raise KeyError(f"unknown OpenCLIP key {key!r} (not a ViT CLIP state dict?)")
    return out


def _layers(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    found = {int(m.group(2)) for k in state_dict if (m := _BLOCK.match(k.removeprefix("module."))) and
             bool(m.group(1)) == (prefix == "visual.")}
    return max(found) + 1


def clip_config_for_openclip(state_dict: dict[str, torch.Tensor], vision_heads: int, text_heads: int,
                             hidden_act: str = "gelu") -> transformers.CLIPConfig:
    """A ``CLIPConfig`` whose shapes are read off an OpenCLIP state dict; the head counts and activation
    are not recoverable from the weights, so they come from the architecture's name."""
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    text_width = sd["token_embedding.weight"].shape[1]
    vision = dict(hidden_size=width, intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  num_hidden_layers=_layers(sd, "visual."), num_attention_heads=vision_heads,
                  image_size=grid * patch, patch_size=patch, hidden_act=hidden_act, layer_norm_eps=1e-5)
    # eos_token_id 2 makes transformers pool at argmax(input_ids) = the end-of-text token, as OpenCLIP does
    text = dict(vocab_size=sd["token_embedding.weight"].shape[0], hidden_size=text_width,
                intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                num_hidden_layers=_layers(sd, ""), num_attention_heads=text_heads,
                max_position_embeddings=sd["positional_embedding"].shape[0], hidden_act=hidden_act,
                layer_norm_eps=1e-5, eos_token_id=2)
    return transformers.CLIPConfig(text_config=text, vision_config=vision,
                                   projection_dim=sd["text_projection"].shape[1])


def load_openclip_checkpoint(state_dict: dict[str, torch.Tensor], vision_heads: int, text_heads: int,
                             hidden_act: str = "gelu") -> transformers.CLIPModel:
    """An OpenCLIP ViT state dict → a loaded ``CLIPModel`` (float32, eval); every weight must match."""
    config = clip_config_for_openclip(state_dict, vision_heads, text_heads, hidden_act)
    model = transformers.CLIPModel(config)
    converted = {k: v.float() for k, v in openclip_to_transformers(state_dict).items()}
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # buffers transformers rebuilds
    if missing or unexpected:
        raise KeyError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval().requires_grad_(False)


def _read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    # weights_only: a checkpoint is data, and must not run code when it is read
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint


def load_hpsv2(checkpoint: str | None, tokenizer_source: str, device: str | torch.device = "cpu") -> ClipScorer:
    """HPSv2.1 as a ``ClipScorer``: the OpenCLIP ViT-H/14 checkpoint converted into a CLIPModel.

    ``checkpoint``: a local .pt file, or None for HPS_v2.1_compressed.pt from the xswu/HPSv2 hub repo
    (from the local cache under HF_HUB_OFFLINE=1). The tokenizer is OpenAI CLIP's BPE, which OpenCLIP's
    ViT-H/14 shares, so any CLIP tokenizer folder or id serves.
    """
    source = checkpoint or f"{HPS_REPO}/{HPS_FILE}"
    try:
        if checkpoint is None:
            from huggingface_hub import hf_hub_download

            checkpoint = hf_hub_download(HPS_REPO, HPS_FILE)
        elif not os.path.isfile(os.path.expanduser(checkpoint)):
            raise FileNotFoundError("no such file")
        model = load_openclip_checkpoint(_read_checkpoint(os.path.expanduser(checkpoint)), **VIT_H14_HEADS)
    except Exception as error:  # noqa: BLE001
        raise load_error("hpsv2", source, f"{type(error).__name__}: {error}", "--hpsv2",
                         local=f"the {HPS_FILE} file of the {HPS_REPO} hub repo") from error
    try:
        tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_source)
        _check_tokenizer(tokenizer)
    except Exception as error:  # noqa: BLE001
        raise load_error("hpsv2 (tokenizer)", tokenizer_source, f"{type(error).__name__}: {error}",
                         "--hpsv2-tokenizer") from error
    size = int(model.config.vision_config.image_size)
    return ClipScorer(model.to(device), tokenizer, resize=size, crop=size, mean=OPENAI_MEAN, std=OPENAI_STD,
                      name=f"HPSv2.1 ({source})")
