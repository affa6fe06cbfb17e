"""Check mvsdi's ImageReward v1.0 and HPSv2.1 converters against the official model code, with random weights.

No weights are downloaded. The official model definitions (image-reward 1.5's ImageReward/BLIP, open_clip's
ViT-H-14) are built with random weights in an ISOLATED environment, their state dicts are saved in the
official layout, loaded back through mvsdi's converters in the project environment, and the two sides'
outputs are compared on the same images and texts.

    # 1. the isolated environment (never the project's .venv: these pins break it)
    python -m venv /tmp/venv-official
    /tmp/venv-official/bin/pip install /opt/wheels/torch-2.13.0+cpu-*.whl numpy pillow ftfy regex transformers==4.30.2
    /tmp/venv-official/bin/pip install --no-deps torchvision==0.28.0 timm==0.6.13 open_clip_torch==2.24.0
    /tmp/venv-official/bin/pip install --no-deps image-reward==1.5
    /tmp/venv-official/bin/pip install --no-deps --no-build-isolation fairscale==0.4.13
    # 2. both sides, then the comparison (writes DIR/report.json)
    .venv/bin/python benchmarks/verify_reward_models.py --official-python /tmp/venv-official/bin/python --out DIR

Shims on the official side, and why (none touches the model code):
- ``torchvision._meta_registrations`` is replaced by an empty module: PyPI's torchvision wheels are CUDA builds
  whose ``_C.so`` needs ``libc10_cuda.so``, absent from the CPU torch, so registering meta kernels for its C++
  ops fails at import. The models use only ``torchvision.transforms`` (pure Python).
- ``clip`` (openai-clip) is an empty module and the ``ImageReward`` package's ``__init__`` is skipped: they
  serve the package's CLIP/aesthetic scores and its ReFL trainer (diffusers, accelerate, datasets), not the reward.
- BLIP's ``init_tokenizer`` downloads bert-base-uncased; it is replaced by the same construction (BertTokenizer
  plus [DEC] as bos and [ENC]) over a local 30,522-entry WordPiece vocabulary, which both sides use.
- ``med_config.json`` cannot be downloaded; BLIP's (salesforce/BLIP configs/med_config.json: bert-base,
  vocab 30524, cross-attention) is written instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

PROMPTS = ["a photograph of an astronaut riding a horse", "A DSLR photo of a red car on the beach",
           "a zoomed out photo of a small tiger, highly detailed"]
MED_CONFIG = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
              "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert",
              "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2,
              "vocab_size": 30524, "encoder_width": 768, "add_cross_attention": True}
WORDS = ("a an the of on in with riding horse astronaut photograph photo dslr red car beach zoomed out small tiger "
         "highly detailed , . ##s ##ed ##ing").split()


def write_inputs(out: Path, n_images: int = 3) -> None:
    """Render-like 512² PNGs (smooth colour fields), BLIP's med_config and a WordPiece vocabulary of BERT's size."""
    import imageio.v3 as iio

    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(n_images, 3, 6, 6, generator=g)
    images = torch.nn.functional.interpolate(coarse, size=(512, 512), mode="bilinear", align_corners=False)
    for i, image in enumerate(images):
        iio.imwrite(out / f"image_{i}.png", (image.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
    (out / "med_config.json").write_text(json.dumps(MED_CONFIG))
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = list(dict.fromkeys(special + letters + WORDS))
    vocab += [f"[unused{i}]" for i in range(30522 - len(vocab))]  # BERT's vocabulary size, so ids fit the model
    (out / "bert").mkdir(exist_ok=True)
    (out / "bert" / "vocab.txt").write_text("\n".join(vocab) + "\n")


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, LayerNorms included (their 1/0 init would hide a swapped norm)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


# ---------------------------------------------------------------------------------------------
# the official side (runs in the isolated environment)


def official_shims(out: Path) -> None:
    import importlib.util

    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    sys.modules["clip"] = types.ModuleType("clip")
    spec = importlib.util.find_spec("ImageReward")
    package = types.ModuleType("ImageReward")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["ImageReward"] = package

    import ImageReward.models.BLIP.blip_pretrain as blip_pretrain
    from transformers import BertTokenizer

    def init_tokenizer():  # BLIP's construction over the local vocabulary
        tokenizer = BertTokenizer(vocab_file=str(out / "bert" / "vocab.txt"))
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
        return tokenizer

    blip_pretrain.init_tokenizer = init_tokenizer


def official_image_reward(out: Path, images: list) -> dict:
    from ImageReward.ImageReward import ImageReward

    torch.manual_seed(1)
    model = ImageReward(med_config=str(out / "med_config.json"), device="cpu").eval()
    perturb(model, seed=1)
    torch.save(model.state_dict(), out / "ImageReward.pt")
    pixels = torch.stack([model.preprocess(im) for im in images])
    tokens = model.blip.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        vision = model.blip.visual_encoder(pixels)
        same_pixels = [[model.score_gard(tokens.input_ids[j:j + 1], tokens.attention_mask[j:j + 1],
                                         pixels[i:i + 1]).item() for i in range(len(images))]
                       for j in range(len(PROMPTS))]
        end_to_end = [[model.score(p, im) for im in images] for p in PROMPTS]
    torch.save({"pixels": pixels, "input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask,
                "vision": vision}, out / "image_reward_io.pt")
    return {"same_pixels": same_pixels, "end_to_end": end_to_end}


def official_hpsv2(out: Path, images: list) -> dict:
    import open_clip

    torch.manual_seed(2)
    model, _, preprocess_val = open_clip.create_model_and_transforms("ViT-H-14", pretrained=None)
    model.eval()
    perturb(model, seed=2)
    torch.save({"state_dict": model.state_dict()}, out / "hps.pt")
    tokenizer = open_clip.get_tokenizer("ViT-H-14")
    # the same BPE as a transformers CLIPTokenizer folder: vocab.json + merges.txt, the two special tokens
    # spelt as transformers spells them (same ids), else it would add them as new, out-of-range tokens
    spelling = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (out / "clip-tokenizer").mkdir(exist_ok=True)
    vocab = {spelling.get(token, token): i for token, i in tokenizer.encoder.items()}
    (out / "clip-tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    (out / "clip-tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))
    pixels = torch.stack([preprocess_val(im) for im in images])
    with torch.no_grad():
        image_features = model.encode_image(pixels, normalize=True)
        text_features = model.encode_text(tokenizer(PROMPTS), normalize=True)
    torch.save({"pixels": pixels, "image_features": image_features, "text_features": text_features},
               out / "hps_io.pt")
    return {"scores": (image_features @ text_features.T).tolist()}  # HPSv2's score: diag of this per pair


def run_official(out: Path) -> None:
    from PIL import Image

    official_shims(out)
    images = [Image.open(p).convert("RGB") for p in sorted(out.glob("image_*.png"))]
    result = {"image_reward": official_image_reward(out, images), "hpsv2": official_hpsv2(out, images)}
    (out / "official.json").write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# mvsdi's side (the project environment)


def max_diff(a, b) -> float:
    return float((torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max())


def ours_image_reward(out: Path, official: dict) -> dict:
    from transformers import BertTokenizer

    from mvsdi.evaluate.clip_metrics import OPENAI_MEAN, OPENAI_STD, preprocess
    from mvsdi.evaluate.image_reward import load_image_reward
    from mvsdi.evaluate.run_folder import load_images

    tokenizer_folder = out / "bert-ours"
    BertTokenizer(vocab=str(out / "bert" / "vocab.txt")).save_pretrained(tokenizer_folder)
    scorer = load_image_reward(str(out), str(tokenizer_folder))
    io = torch.load(out / "image_reward_io.pt", weights_only=True)
    tokens = scorer.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    images = torch.stack(load_images(sorted(out.glob("image_*.png"))))
    n = len(images)
    with torch.no_grad():
        vision = scorer.model.vision(pixel_values=io["pixels"]).last_hidden_state
        same_pixels = [scorer.model(io["pixels"], ids.expand(n, -1), mask.expand(n, -1)).tolist()
                       for ids, mask in zip(io["input_ids"], io["attention_mask"])]
    end_to_end = [scorer.score(images, p).tolist() for p in PROMPTS]
    return {"token_ids_equal": bool(torch.equal(tokens.input_ids, io["input_ids"])),
            "vision_tokens_max_abs_diff": max_diff(vision, io["vision"]),
            "reward_same_pixels_max_abs_diff": max_diff(same_pixels, official["same_pixels"]),
            "reward_end_to_end_max_abs_diff": max_diff(end_to_end, official["end_to_end"]),
            "reward_range": [float(np.min(official["end_to_end"])), float(np.max(official["end_to_end"]))],
            "preprocess_max_abs_diff": max_diff(preprocess(images, 224, 224, OPENAI_MEAN, OPENAI_STD), io["pixels"])}


def ours_hpsv2(out: Path, official: dict) -> dict:
    from mvsdi.evaluate.clip_metrics import clip_score, cosine_matrix, load_hpsv2, normalise
    from mvsdi.evaluate.run_folder import load_images

    scorer = load_hpsv2(str(out / "hps.pt"), str(out / "clip-tokenizer"))
    io = torch.load(out / "hps_io.pt", weights_only=True)
    with torch.no_grad():
        pooled = scorer.model.vision_model(pixel_values=io["pixels"]).pooler_output
        image_features = normalise(scorer.model.visual_projection(pooled))
    text_features = normalise(scorer.embed_texts(PROMPTS))
    images = torch.stack(load_images(sorted(out.glob("image_*.png"))))
    end_to_end = torch.stack([clip_score(scorer.embed_images(images), t) for t in scorer.embed_texts(PROMPTS)])
    return {"image_features_max_abs_diff": max_diff(image_features, io["image_features"]),
            "text_features_max_abs_diff": max_diff(text_features, io["text_features"]),
            "score_same_pixels_max_abs_diff": max_diff(cosine_matrix(image_features, text_features),
                                                       official["scores"]),
            "score_end_to_end_max_abs_diff": max_diff(end_to_end.T, official["scores"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="working folder (≈6 GB of random checkpoints)")
    p.add_argument("--official-python", help="the isolated environment's python (runs the official side)")
    p.add_argument("--role", choices=["official", "compare"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.role == "official":
        return run_official(args.out)
    if args.role is None:
        if not args.official_python:
            p.error("give --official-python (see the setup at the top of this file)")
        write_inputs(args.out)
        subprocess.run([args.official_python, __file__, "--role", "official", "--out", str(args.out)], check=True)
    official = json.loads((args.out / "official.json").read_text())
    report = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "image_reward": ours_image_reward(args.out, official["image_reward"]),
              "hpsv2": ours_hpsv2(args.out, official["hpsv2"])}
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
