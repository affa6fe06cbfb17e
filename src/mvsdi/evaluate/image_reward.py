"""ImageReward v1.0 on transformers' BLIP classes, without the official ``image-reward`` package.

The official package pins timm 0.6.13 and pulls a torchvision that breaks this install (docs/design.md,
"The dependency stack"), so its checkpoint (THUDM/ImageReward: ``ImageReward.pt`` + ``med_config.json``) is
loaded here into ``transformers.BlipVisionModel`` (BLIP's ViT, 224², patch 16) and ``BlipTextModel`` (BLIP's BERT
"med" encoder with cross-attention to the image tokens) plus the reward head, a stack of linear layers.

What the official scorer (``ImageReward.score`` / ``inference_rank`` in image-reward 1.5) does, and this
module reproduces: the prompt tokenised by BLIP's tokenizer (bert-base-uncased plus the added tokens
[DEC] and [ENC]) padded to 35 tokens, **its first token left as [CLS]** (BLIP's ITM head swaps in [ENC];
the ImageReward scorer does not); the image resized (bicubic, short side 224), centre-cropped and
normalised with OpenAI CLIP's mean/std; the text encoder's first output token through the head
768→1024→128→64→16→1 (dropout only between the layers, no activation); then
(reward − 0.16717…) / 1.03333…. benchmarks/verify_reward_models.py checks the conversion against the
official code; docs/evaluation.md has the numbers.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from mvsdi.evaluate.clip_metrics import OPENAI_MEAN, OPENAI_STD, load_error, preprocess

IMAGE_REWARD_REPO = "THUDM/ImageReward"
IMAGE_REWARD_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
BLIP_TOKENIZER = "bert-base-uncased"
BLIP_ADDED_TOKENS = {"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]}
MAX_TEXT_TOKENS = 35
# ImageReward.__init__'s constants: the raw head output's mean and std over its training set
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
# BLIP's create_vit: "base" 768 wide with 12 heads, "large" 1024 wide with 16: heads 64 wide in both. The head
# count is not recoverable from the weights, so it follows that rule.
BLIP_VIT_HEAD_WIDTH = 64
BLIP_VIT_LAYER_NORM_EPS = 1e-6  # BLIP's ViT uses partial(nn.LayerNorm, eps=1e-6); transformers defaults to 1e-5
FLAG = "--image-reward"

_VISION = "blip.visual_encoder."
_TEXT = "blip.text_encoder."
_HEAD = re.compile(r"^mlp\.layers\.(\d+)\.(weight|bias)$")
_VIT_BLOCK = re.compile(r"^blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)$")
_VIT_BLOCK_PARTS = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                    "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_VIT_PLAIN = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
              "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
              "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
              "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}


def normalise_reward(raw: torch.Tensor) -> torch.Tensor:
    """The head's raw output → ImageReward's reported score (standardised by its training statistics)."""
    return (raw - REWARD_MEAN) / REWARD_STD


class ImageRewardModel(nn.Module):
    """BLIP image encoder + cross-attending text encoder + linear head; ``forward`` gives normalised rewards."""

    def __init__(self, vision_config: transformers.BlipVisionConfig, text_config: transformers.BlipTextConfig,
                 head_sizes: list[int]):
        super().__init__()
        self.vision = transformers.BlipVisionModel(vision_config)
        self.text = transformers.BlipTextModel(text_config, add_pooling_layer=False)
        # the official head interleaves Dropout layers but no activation: in eval it is a chain of affine maps
        self.head = nn.Sequential(*(nn.Linear(a, b) for a, b in zip(head_sizes[:-1], head_sizes[1:])))

    def raw_reward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] normalised pixels and [N, L] tokens → [N] head outputs before normalisation."""
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state  # after BLIP's final LayerNorm
        image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.long, device=image_tokens.device)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens,
                         encoder_attention_mask=image_mask, is_decoder=False).last_hidden_state
        return self.head(text[:, 0].to(self.head[0].weight.dtype))[:, 0]  # a half encoder feeds the head

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return normalise_reward(self.raw_reward(pixels, input_ids, attention_mask))


# ---------------------------------------------------------------------------------------------
# the official state dict → ImageRewardModel


def _vision_key(rest: str) -> str:
    if rest in _VIT_PLAIN:
        return "vision." + _VIT_PLAIN[rest]
    if match := _VIT_BLOCK.match(rest):
        layer, part, kind = match.groups()
        return f"vision.encoder.layers.{layer}.{_VIT_BLOCK_PARTS[part]}.{kind}"
    raise KeyError(f"unknown key of BLIP's ViT: {_VISION}{rest!r}")


def _head_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """mlp.layers.{0,2,4,6,7} (Linear layers between Dropouts) → head.{0..4}, in order."""
    indices = sorted({int(m.group(1)) for k in state_dict if (m := _HEAD.match(k))})
    rank = {index: i for i, index in enumerate(indices)}
    return {k: f"head.{rank[int(m.group(1))]}.{m.group(2)}" for k in state_dict if (m := _HEAD.match(k))}


def image_reward_to_ours(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """ImageReward.pt's keys → ``ImageRewardModel``'s; returns (converted, ignored keys).

    The text encoder's keys are already transformers' BLIP names under another prefix. Keys of modules the
    reward never uses (BLIP's contrastive projections ``vision_proj``/``text_proj``, the position-id buffer)
    are ignored, as the official ``load_state_dict(strict=False)`` ignores them; an unknown key inside the
    ViT raises, because it would mean another architecture.
    """
    head_keys = _head_keys(state_dict)
    out: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, value in state_dict.items():
        if key.startswith(_VISION):
            out[_vision_key(key[len(_VISION):])] = value
        elif key.startswith(_TEXT) and not key.endswith("embeddings.position_ids"):
            out["text." + key[len(_TEXT):]] = value
        elif key in head_keys:
            out[head_keys[key]] = value
        else:
            ignored.append(key)
    return out, ignored


def configs_for_image_reward(state_dict: dict[str, torch.Tensor], med_config: dict[str, Any]):
    """(BlipVisionConfig, BlipTextConfig, head sizes): shapes read off the weights, the text encoder's
    hyper-parameters from med_config.json, the ViT's head count from BLIP's 64-wide heads."""
    width = state_dict[_VISION + "cls_token"].shape[-1]
    patch = state_dict[_VISION + "patch_embed.proj.weight"].shape[-1]
    grid = round((state_dict[_VISION + "pos_embed"].shape[1] - 1) ** 0.5)
    layers = 1 + max(int(m.group(1)) for k in state_dict
                     if k.startswith(_VISION) and (m := _VIT_BLOCK.match(k[len(_VISION):])))
    if width % BLIP_VIT_HEAD_WIDTH:
        raise ValueError(f"a BLIP ViT {width} wide cannot have {BLIP_VIT_HEAD_WIDTH}-wide heads")
    vision = transformers.BlipVisionConfig(
        hidden_size=width, intermediate_size=state_dict[_VISION + "blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers, num_attention_heads=width // BLIP_VIT_HEAD_WIDTH,
        image_size=grid * patch, patch_size=patch, hidden_act="gelu", layer_norm_eps=BLIP_VIT_LAYER_NORM_EPS)
    text_keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id")
    # BLIP_Pretrain sets the cross-attention input width to the ViT's, whatever encoder_width the file says;
    # is_decoder=True only makes transformers build the cross-attention layers (forward runs bidirectionally)
    text = transformers.BlipTextConfig(**{k: med_config[k] for k in text_keys if k in med_config},
                                       encoder_hidden_size=width, is_decoder=True, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0,
                                       bos_token_id=None, eos_token_id=None, sep_token_id=None)  # generation only
    head = [state_dict[k].shape for k in sorted(_head_keys(state_dict), key=lambda k: int(_HEAD.match(k).group(1)))
            if k.endswith("weight")]
    return vision, text, [head[0][1], *(shape[0] for shape in head)]


def load_image_reward_model(state_dict: dict[str, torch.Tensor], med_config: dict[str, Any]) -> ImageRewardModel:
    """The official state dict → a loaded ``ImageRewardModel`` (float32, eval); every weight it needs must be there."""
    vision, text, head = configs_for_image_reward(state_dict, med_config)
    model = ImageRewardModel(vision, text, head)
    converted, _ = image_reward_to_ours(state_dict)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in converted.items()}, strict=False)
    if missing or unexpected:
        raise KeyError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# tokenizer, scorer, loader


def load_blip_tokenizer(source: str) -> transformers.BertTokenizer:
    """bert-base-uncased (hub id or folder) with BLIP's added tokens, as BLIP's init_tokenizer builds it."""
    tokenizer = transformers.BertTokenizer.from_pretrained(source)
    tokenizer.add_special_tokens(dict(BLIP_ADDED_TOKENS))
    return tokenizer


@dataclass
class ImageRewardScorer:
    """ImageReward as a function of images [N, 3, H, W] in [0, 1] and one prompt → [N] rewards."""

    model: ImageRewardModel
    tokenizer: Any
    name: str
    batch_size: int = 8

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        size = int(self.model.vision.config.image_size)
        tokens = self.tokenizer([prompt], padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS,
                                return_tensors="pt").to(self.device)
        out = []
        for chunk in images.split(self.batch_size):
            pixels = preprocess(chunk.to(self.device), size, size, OPENAI_MEAN, OPENAI_STD)
            n = len(chunk)
            out.append(self.model(pixels, tokens.input_ids.expand(n, -1), tokens.attention_mask.expand(n, -1)).cpu())
        return torch.cat(out)


def _local_files(path: Path) -> tuple[Path, Path]:
    """A folder holding both files (a hub snapshot), or ImageReward.pt with med_config.json beside it."""
    checkpoint = path / IMAGE_REWARD_FILE if path.is_dir() else path
    med_config = checkpoint.parent / MED_CONFIG_FILE
    for needed in (checkpoint, med_config):
        if not needed.is_file():
            raise FileNotFoundError(f"no file {needed}")
    return checkpoint, med_config


def _hub_files() -> tuple[Path, Path]:
    from huggingface_hub import hf_hub_download

    return (Path(hf_hub_download(IMAGE_REWARD_REPO, IMAGE_REWARD_FILE)),
            Path(hf_hub_download(IMAGE_REWARD_REPO, MED_CONFIG_FILE)))


def load_image_reward(path: str | None, tokenizer_source: str = BLIP_TOKENIZER,
                      device: str | torch.device = "cpu") -> ImageRewardScorer:
    """ImageReward v1.0 from a local folder/file (``path``) or, when None, the THUDM/ImageReward hub repo
    (from the local cache under HF_HUB_OFFLINE=1). Every failure becomes a ``MetricLoadError``."""
    source = path or f"{IMAGE_REWARD_REPO} ({IMAGE_REWARD_FILE}, {MED_CONFIG_FILE})"
    local = f"a folder with {IMAGE_REWARD_FILE} and {MED_CONFIG_FILE} from the {IMAGE_REWARD_REPO} hub repo"
    try:
        checkpoint, med_config = _local_files(Path(path).expanduser()) if path else _hub_files()
        # weights_only: a checkpoint is data and must not run code when it is read
        state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model = load_image_reward_model(state_dict, json.loads(med_config.read_text()))
    except Exception as error:  # noqa: BLE001 - every loader failure becomes one actionable error
        raise load_error("image_reward", source, f"{type(error).__name__}: {error}", FLAG, local=local) from error
    try:
        tokenizer = load_blip_tokenizer(tokenizer_source)
        if len(tokenizer) != model.text.config.vocab_size:
            raise ValueError(f"{len(tokenizer)} tokens, but the text encoder has {model.text.config.vocab_size}; "
                             f"ImageReward needs {BLIP_TOKENIZER} plus BLIP's [DEC] and [ENC]")
    except Exception as error:  # noqa: BLE001
        raise load_error("image_reward (tokenizer)", tokenizer_source, f"{type(error).__name__}: {error}",
                         FLAG + "-tokenizer", local=f"a {BLIP_TOKENIZER} tokenizer folder") from error
    return ImageRewardScorer(model.to(device), tokenizer, name=f"ImageReward v1.0 ({os.fspath(source)})")
