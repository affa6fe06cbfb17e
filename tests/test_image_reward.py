"""ImageReward v1.0 through transformers: a tiny random checkpoint in the official key layout, converted and
scored, against an independent forward pass written from the official BLIP code; the normalisation; the
loader's errors; and the metric through `mvsdi eval`."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_evaluate import eval_cli, make_run, random_block, textured

from mvsdi.evaluate import image_reward as ir
from mvsdi.evaluate.clip_metrics import OPENAI_MEAN, OPENAI_STD, MetricLoadError

WORDS = ["a", "an", "the", "cat", "dog", "red", "blue", "car", "on", "photo", "of", "##s", "##ing"]
VISION = dict(width=128, heads=2, layers=2, patch=8, grid=4)  # 32² images; BLIP heads are 64 wide
TEXT = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
            max_position_embeddings=40, layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0)
# BLIP's ViT block keys, in the order of test_evaluate.OPENCLIP_BLOCK
BLIP_VIT_BLOCK = ("norm1.", "norm2.", "attn.qkv.", "attn.proj.", "mlp.fc1.", "mlp.fc2.")
HEAD_INDICES = (0, 2, 4, 6, 7)  # the official nn.Sequential: Linear/Dropout pairs, then two Linears
HEAD_SIZES = (32, 16, 8, 4, 2, 1)


def bert_vocab() -> dict[str, int]:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"bcdefghijklmnopqrstuvwxyz", *WORDS]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    from transformers import BertTokenizer

    folder = tmp_path_factory.mktemp("bert-tokenizer")
    BertTokenizer(vocab=bert_vocab()).save_pretrained(folder)
    return folder


def med_config() -> dict:
    # the file's encoder_width is overridden by the ViT's width, as BLIP_Pretrain does
    return {**TEXT, "vocab_size": len(bert_vocab()) + 2, "encoder_width": 768, "add_cross_attention": True}


def official_state_dict(seed=0) -> dict[str, torch.Tensor]:
    """Random weights under ImageReward.pt's keys (ImageReward module: blip.visual_encoder / text_encoder, mlp)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    w, t = VISION["width"], TEXT["hidden_size"]
    v = "blip.visual_encoder."
    sd = {v + "cls_token": r(1, 1, w), v + "pos_embed": r(1, VISION["grid"] ** 2 + 1, w),
          v + "patch_embed.proj.weight": r(w, 3, VISION["patch"], VISION["patch"]), v + "patch_embed.proj.bias": r(w),
          v + "norm.weight": 1 + r(w, scale=0.1), v + "norm.bias": r(w, scale=0.1),
          # unused by the reward: BLIP's contrastive projections and the position-id buffer
          "blip.vision_proj.weight": r(8, w), "blip.vision_proj.bias": r(8), "blip.text_proj.weight": r(8, t),
          "blip.text_proj.bias": r(8), "blip.text_encoder.embeddings.position_ids": torch.arange(40).expand(1, -1)}
    for i in range(VISION["layers"]):
        sd.update(random_block(r, f"{v}blocks.{i}.", BLIP_VIT_BLOCK, w, 4 * w))
    e = "blip.text_encoder.embeddings."
    sd.update({e + "word_embeddings.weight": r(med_config()["vocab_size"], t),
               e + "position_embeddings.weight": r(TEXT["max_position_embeddings"], t),
               e + "LayerNorm.weight": 1 + r(t, scale=0.1), e + "LayerNorm.bias": r(t, scale=0.1)})
    for i in range(TEXT["num_hidden_layers"]):
        p = f"blip.text_encoder.encoder.layer.{i}."
        for block, kv_width in (("attention.", t), ("crossattention.", w)):
            sd.update({p + block + "self.query.weight": r(t, t), p + block + "self.query.bias": r(t),
                       p + block + "self.key.weight": r(t, kv_width), p + block + "self.key.bias": r(t),
                       p + block + "self.value.weight": r(t, kv_width), p + block + "self.value.bias": r(t),
                       p + block + "output.dense.weight": r(t, t), p + block + "output.dense.bias": r(t),
                       p + block + "output.LayerNorm.weight": 1 + r(t, scale=0.1),
                       p + block + "output.LayerNorm.bias": r(t, scale=0.1)})
        sd.update({p + "intermediate.dense.weight": r(64, t), p + "intermediate.dense.bias": r(64),
                   p + "output.dense.weight": r(t, 64), p + "output.dense.bias": r(t),
                   p + "output.LayerNorm.weight": 1 + r(t, scale=0.1), p + "output.LayerNorm.bias": r(t, scale=0.1)})
    for index, (a, b) in zip(HEAD_INDICES, zip(HEAD_SIZES[:-1], HEAD_SIZES[1:])):
        sd[f"mlp.layers.{index}.weight"], sd[f"mlp.layers.{index}.bias"] = r(b, a, scale=0.5), r(b)
    return sd


# ---------------------------------------------------------------------------------------------
# an independent forward pass, written from the official vit.py / med.py / ImageReward.py


def attention(x, memory, w, prefix, heads, key_mask=None):
    """Multi-head attention of x over memory with separate (q, k, v) or packed (qkv) projections."""
    if prefix + "qkv.weight" in w:
        q, k, v = F.linear(x, w[prefix + "qkv.weight"], w[prefix + "qkv.bias"]).chunk(3, dim=-1)
    else:
        q, k, v = (F.linear(src, w[f"{prefix}{n}.weight"], w[f"{prefix}{n}.bias"])
                   for n, src in (("query", x), ("key", memory), ("value", memory)))
    split = lambda y: y.reshape(*y.shape[:2], heads, -1).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / (q.shape[-1] // heads) ** 0.5
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :].bool(), float("-inf"))
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).flatten(2)


def reference_vit(sd, pixels):
    v, width = "blip.visual_encoder.", VISION["width"]
    x = F.conv2d(pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=VISION["patch"])
    x = torch.cat([sd[v + "cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + sd[v + "pos_embed"]
    ln = lambda y, p: F.layer_norm(y, (width,), sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)  # noqa: E731
    for i in range(VISION["layers"]):
        b = f"{v}blocks.{i}."
        h = ln(x, b + "norm1")
        x = x + F.linear(attention(h, h, sd, b + "attn.", VISION["heads"]), sd[b + "attn.proj.weight"],
                         sd[b + "attn.proj.bias"])
        h = F.gelu(F.linear(ln(x, b + "norm2"), sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        x = x + F.linear(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    return ln(x, v + "norm")


def reference_reward(sd, pixels, ids, mask):
    t, heads = TEXT["hidden_size"], TEXT["num_attention_heads"]
    image = reference_vit(sd, pixels)
    e = "blip.text_encoder.embeddings."
    ln = lambda y, p: F.layer_norm(y, (t,), sd[p + ".weight"], sd[p + ".bias"], eps=1e-12)  # noqa: E731
    x = ln(sd[e + "word_embeddings.weight"][ids] + sd[e + "position_embeddings.weight"][: ids.shape[1]],
           e + "LayerNorm")
    for i in range(TEXT["num_hidden_layers"]):  # BERT post-norm: self-attention, cross-attention, feed-forward
        p = f"blip.text_encoder.encoder.layer.{i}."
        for block, memory, key_mask in (("attention.", x, mask), ("crossattention.", image, None)):
            a = attention(x, x if block == "attention." else memory, sd, p + block + "self.", heads, key_mask)
            x = ln(F.linear(a, sd[p + block + "output.dense.weight"], sd[p + block + "output.dense.bias"]) + x,
                   p + block + "output.LayerNorm")
        h = F.gelu(F.linear(x, sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"]))
        x = ln(F.linear(h, sd[p + "output.dense.weight"], sd[p + "output.dense.bias"]) + x, p + "output.LayerNorm")
    r = x[:, 0]
    for index in HEAD_INDICES:
        r = F.linear(r, sd[f"mlp.layers.{index}.weight"], sd[f"mlp.layers.{index}.bias"])
    return (r[:, 0] - 0.16717362830052426) / 1.0333394966054072


# ---------------------------------------------------------------------------------------------
# tests


@pytest.fixture(scope="module")
def checkpoint_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("image-reward")
    torch.save({k: v.half() for k, v in official_state_dict().items()}, folder / ir.IMAGE_REWARD_FILE)
    (folder / ir.MED_CONFIG_FILE).write_text(json.dumps(med_config()))
    return folder


def test_converted_checkpoint_gives_the_reference_reward(tokenizer_folder):
    sd = official_state_dict()
    model = ir.load_image_reward_model(sd, med_config())
    assert model.vision.config.image_size == 32 and model.text.config.encoder_hidden_size == 128
    assert model.vision.config.layer_norm_eps == 1e-6
    converted, ignored = ir.image_reward_to_ours(sd)
    # BLIP's contrastive projections are not part of the reward; the position ids are a buffer transformers rebuilds
    assert sorted(ignored) == ["blip.text_encoder.embeddings.position_ids", "blip.text_proj.bias",
                               "blip.text_proj.weight", "blip.vision_proj.bias", "blip.vision_proj.weight"]
    assert len(converted) == len(official_state_dict()) - len(ignored)
    tokens = ir.load_blip_tokenizer(str(tokenizer_folder))(["a red car", "photo of the cat on the blue car"],
                                                           padding="max_length", max_length=ir.MAX_TEXT_TOKENS,
                                                           return_tensors="pt")
    assert tokens.input_ids[0, 0] == bert_vocab()["[CLS]"]  # the ImageReward scorer keeps [CLS] first
    # float64 on both sides: the two compute attention in different orders of operations
    model, sd = model.double(), {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ours = model(pixels, tokens.input_ids, tokens.attention_mask)
    expected = reference_reward(sd, pixels, tokens.input_ids, tokens.attention_mask)
    assert torch.allclose(ours, expected, rtol=1e-9, atol=1e-9), (ours, expected)
    assert (ours[0] - ours[1]).abs() > 1e-3  # text and image reach the reward: the two pairs differ


def test_rewards_are_normalised_with_the_official_constants():
    sd = official_state_dict()
    for index in HEAD_INDICES:  # a head that outputs its last bias whatever the input
        sd[f"mlp.layers.{index}.weight"].zero_()
    sd["mlp.layers.7.bias"].fill_(2.5)
    model = ir.load_image_reward_model(sd, med_config())
    ids = torch.tensor([[2, 5, 3]])
    with torch.no_grad():
        assert model.raw_reward(torch.zeros(1, 3, 32, 32), ids, torch.ones_like(ids)).item() == pytest.approx(2.5)
        reward = model(torch.zeros(1, 3, 32, 32), ids, torch.ones_like(ids)).item()
    assert reward == pytest.approx((2.5 - 0.16717362830052426) / 1.0333394966054072, abs=1e-6)


def test_converter_refuses_a_vit_it_does_not_know():
    sd = official_state_dict()
    sd["blip.visual_encoder.blocks.0.ls1.gamma"] = torch.ones(128)  # a layer scale: another architecture
    with pytest.raises(KeyError, match="ls1"):
        ir.image_reward_to_ours(sd)
    del sd["blip.visual_encoder.blocks.0.ls1.gamma"], sd["blip.text_encoder.encoder.layer.1.output.dense.weight"]
    with pytest.raises(KeyError, match="missing.*layer.1.output.dense.weight"):
        ir.load_image_reward_model(sd, med_config())


def test_scorer_preprocesses_like_the_official_transform(checkpoint_folder, tokenizer_folder):
    scorer = ir.load_image_reward(str(checkpoint_folder), str(tokenizer_folder))
    images = torch.rand(3, 3, 48, 48)
    prompt = "A red car"
    tokens = scorer.tokenizer([prompt], padding="max_length", max_length=35, return_tensors="pt")
    assert tokens.input_ids.shape == (1, 35)
    # resize 48 → 32 (bicubic, antialiased), centre crop, OpenAI CLIP normalisation
    pixels = F.interpolate(images, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)
    pixels = (pixels - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    sd = {k: v.half().float() for k, v in official_state_dict().items()}  # the file holds half precision
    expected = reference_reward(sd, pixels, tokens.input_ids.expand(3, -1), tokens.attention_mask.expand(3, -1))
    assert torch.allclose(scorer.score(images, prompt), expected, atol=1e-4)


def test_load_errors_name_the_metric_the_source_and_the_fix(checkpoint_folder, tokenizer_folder, tmp_path):
    with pytest.raises(MetricLoadError, match=r"(?s)image_reward.*no file.*--image-reward PATH.*ImageReward.pt"):
        ir.load_image_reward(str(tmp_path / "absent"), str(tokenizer_folder))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / ir.IMAGE_REWARD_FILE).write_bytes(b"not a checkpoint")
    (broken / ir.MED_CONFIG_FILE).write_text(json.dumps(med_config()))
    with pytest.raises(MetricLoadError, match=str(broken)):
        ir.load_image_reward(str(broken), str(tokenizer_folder))
    only_pt = tmp_path / "only"
    only_pt.mkdir()
    (only_pt / ir.IMAGE_REWARD_FILE).write_bytes((checkpoint_folder / ir.IMAGE_REWARD_FILE).read_bytes())
    with pytest.raises(MetricLoadError, match="med_config.json"):
        ir.load_image_reward(str(only_pt / ir.IMAGE_REWARD_FILE), str(tokenizer_folder))
    # a tokenizer without BLIP's vocabulary (here: 2 tokens short) cannot feed this text encoder
    from transformers import BertTokenizer

    short = tmp_path / "short-tokenizer"
    BertTokenizer(vocab=dict(list(bert_vocab().items())[:-2])).save_pretrained(short)
    with pytest.raises(MetricLoadError,
                       match=r"(?s)tokenizer.*tokens, but the text encoder has.*--image-reward-tokenizer"):
        ir.load_image_reward(str(checkpoint_folder), str(short))


def test_mvsdi_eval_image_reward_on_a_run(checkpoint_folder, tokenizer_folder, tmp_path, capsys):
    from mvsdi.evaluate.run_folder import load_images

    run = make_run(tmp_path, "run", "a red car", textured(5))
    flags = ["--metrics", "image_reward", "--image-reward", str(checkpoint_folder),
             "--image-reward-tokenizer", str(tokenizer_folder), "--device", "cpu"]
    code, out, err = eval_cli([str(run), *flags], capsys)
    assert code == 0, err
    assert "image_reward=" in out
    result = json.loads((run / "metrics.json").read_text())["metrics"]["image_reward"]
    scorer = ir.load_image_reward(str(checkpoint_folder), str(tokenizer_folder))
    direct = scorer.score(torch.stack(load_images(sorted((run / "renders").glob("0*.png")))), "a red car")
    assert np.allclose(result["per_view"], direct.numpy(), atol=1e-5) and len(result["per_view"]) == 5
    assert result["mean"] == pytest.approx(float(direct.mean()), abs=1e-5)

    code, _, err = eval_cli([str(run), *flags[:3], str(tmp_path / "typo")], capsys)
    assert code == 2 and "image_reward" in err and "--image-reward PATH" in err and "typo" in err
    code, _, err = eval_cli([str(run), "--metrics", "image_rewards"], capsys)
    assert code == 2 and "unknown metric" in err and "image_reward" in err
