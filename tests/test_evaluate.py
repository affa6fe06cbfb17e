"""`mvsdi eval`: the metric maths on constructed embeddings, the loaders on tiny random models built
here, the divergence rule, the OpenCLIP → transformers converter, and run directories end to end."""

import argparse
import json
import math

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mvsdi
from mvsdi.evaluate import cli, run_folder, runs
from mvsdi.evaluate import clip_metrics as cm
from mvsdi.evaluate.divergence import MEAN_FLOOR, STD_FLOOR, check_divergence, is_degenerate

# ---------------------------------------------------------------------------------------------
# fixtures: fake run directories (the tiny random CLIP is in conftest.py)


def make_run(root, name, prompt, images, version=None, eval_views=None):
    run = root / name
    (run / "renders").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"prompt": prompt, "eval_views": eval_views or len(images)}))
    (run / "summary.json").write_text(json.dumps({"versions": {"mvsdi": version or mvsdi.__version__}}))
    for i, image in enumerate(images):
        iio.imwrite(run / "renders" / f"{i:03d}.png", (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8))
        iio.imwrite(run / "renders" / f"normal_{i:03d}.png", np.zeros((8, 8, 3), np.uint8))  # never evaluated
    return run


def textured(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.uniform(0.1, 0.9, (size, size, 3)) for _ in range(n)]


def eval_cli(argv, capsys):
    parser = argparse.ArgumentParser(prog="mvsdi")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    code = cli.run(parser.parse_args(["eval", *argv]))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------------------
# the maths on constructed embeddings


def test_cosine_and_clip_score_are_scale_free_cosines():
    a = torch.tensor([[3.0, 0.0], [1.0, 1.0], [-2.0, 0.0]])
    text = torch.tensor([5.0, 0.0])
    assert torch.allclose(cm.clip_score(a, text), torch.tensor([1.0, 1 / math.sqrt(2), -1.0]))


def test_r_precision_counts_top1_retrievals_and_ties_as_misses():
    sim = torch.tensor([[0.9, 0.1, 0.2],   # right (col 0) wins
                        [0.3, 0.5, 0.1],   # col 1 wins: miss
                        [0.4, 0.4, 0.0]])  # tie: miss
    assert cm.r_precision(sim, 0).tolist() == [1.0, 0.0, 0.0]
    assert cm.r_precision(sim, 1).tolist() == [0.0, 1.0, 0.0]
    assert cm.r_precision(sim[:, :1], 0).tolist() == [1.0, 1.0, 1.0]  # a single candidate is always retrieved
    with pytest.raises(ValueError, match="outside"):
        cm.r_precision(sim, 3)


def test_clip_iqa_is_the_pairwise_softmax_of_scaled_cosines():
    e = torch.eye(4)
    anchors = torch.stack([e[0], e[1], e[2], e[3]])  # (good, bad), (sharp, blurry)
    image = (e[0] + e[3]).reshape(1, -1)  # cos 1/√2 with "good" and "blurry", 0 with the others
    probs = cm.clip_iqa(image, anchors, logit_scale=1.0)
    c = 1 / math.sqrt(2)
    expected = torch.tensor([[1 / (1 + math.exp(-c)), 1 / (1 + math.exp(c))]])
    assert torch.allclose(probs, expected, atol=1e-6)
    # at CLIP's scale of 100 the same image is decided almost surely
    assert torch.allclose(cm.clip_iqa(image, anchors), torch.tensor([[1.0, 0.0]]), atol=1e-6)
    # equidistant from both anchors: exactly one half
    assert torch.allclose(cm.clip_iqa(e[2:3], anchors[:2]), torch.tensor([[0.5]]))
    with pytest.raises(ValueError, match="pairs"):
        cm.clip_iqa(image, anchors[:3])


def test_janus_score():
    v = torch.tensor([1.0, 2.0, 3.0])
    assert cm.janus_score(v, 2 * v) == pytest.approx(1.0)
    assert cm.janus_score(v, -v) == pytest.approx(-1.0)
    assert cm.janus_score(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 4.0])) == pytest.approx(0.0)


def test_preprocess_resizes_the_short_side_crops_the_centre_and_normalises():
    image = torch.zeros(1, 3, 40, 80)
    image[..., 20:60] = 1.0  # a white centre band exactly as wide as the crop after resizing to 32×64
    out = cm.preprocess(image, resize=32, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert out.shape == (1, 3, 32, 32)
    assert torch.allclose(out[..., 2:-2], torch.ones(1), atol=1e-4)  # white → +1 away from the band edges
    grey = cm.preprocess(torch.full((2, 3, 32, 32), 0.25), 32, 32, (0.5, 0.0, 0.25), (0.5, 0.25, 1.0))
    assert torch.allclose(grey[:, :, 0, 0], torch.tensor([[-0.5, 1.0, 0.0]] * 2))


# ---------------------------------------------------------------------------------------------
# the loader and the scores on a tiny random CLIP


def test_clip_score_equals_a_direct_computation_with_the_model(tiny_clip):
    from transformers import CLIPModel, CLIPTokenizer

    scorer = cm.ClipScorer.load(str(tiny_clip), "test", "--clip-b32")
    assert (scorer.resize, scorer.crop, scorer.mean) == (32, 32, cm.OPENAI_MEAN)  # no preprocessor file: defaults
    images = torch.rand(3, 3, 32, 32)
    prompt = "a ripe strawberry"
    ours = cm.clip_score(scorer.embed_images(images), scorer.embed_texts([prompt])[0])

    model, tok = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPTokenizer.from_pretrained(tiny_clip)
    mean, std = torch.tensor(cm.OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(cm.OPENAI_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(input_ids=tok([prompt], return_tensors="pt").input_ids, pixel_values=(images - mean) / std)
    direct = out.logits_per_image[:, 0] / model.logit_scale.exp()
    assert torch.allclose(ours, direct, atol=1e-5)
    # the text embedding must depend on the text (an empty tokenizer would make all texts alike)
    a, b = scorer.embed_texts(["a cat", "a dog"])
    assert not torch.allclose(a, b)


def test_preprocessor_config_is_read_when_present(tiny_clip, tmp_path):
    import shutil

    folder = tmp_path / "clip"
    shutil.copytree(tiny_clip, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32},
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.2, 0.2, 0.2]}))
    scorer = cm.ClipScorer.load(str(folder), "test", "--clip-b32")
    assert (scorer.resize, scorer.crop, scorer.mean, scorer.std) == (40, 32, (0.5,) * 3, (0.2,) * 3)


def test_missing_model_names_the_metric_the_flag_and_the_fix(tmp_path):
    with pytest.raises(cm.MetricLoadError, match=r"(?s)CLIP-IQA.*--clip-b16.*HF_HUB_OFFLINE") as info:
        cm.ClipScorer.load(str(tmp_path / "nope"), "CLIP-IQA", "--clip-b16")
    assert "no such folder" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(cm.MetricLoadError, match="--clip-b32"):
        cm.ClipScorer.load(str(tmp_path / "empty"), "CLIP score", "--clip-b32")


# ---------------------------------------------------------------------------------------------
# HPSv2.1: an OpenCLIP state dict converted into transformers' CLIPModel


def openclip_state_dict(width=32, layers=2, patch=8, grid=4, text_width=32, vocab=50, context=16, embed=24, seed=0):
    """Random weights in OpenCLIP's ViT key layout (what HPS_v2.1_compressed.pt holds, at ViT-H size)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd = {"visual.conv1.weight": r(width, 3, patch, patch), "visual.class_embedding": r(width),
          "visual.positional_embedding": r(grid * grid + 1, width), "visual.proj": r(width, embed),
          "token_embedding.weight": r(vocab, text_width), "positional_embedding": r(context, text_width),
          "text_projection": r(text_width, embed), "logit_scale": torch.tensor(4.6052),
          "attn_mask": torch.full((context, context), float("-inf")).triu(1)}
    for name, w in (("visual.ln_pre", width), ("visual.ln_post", width), ("ln_final", text_width)):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = 1 + r(w, scale=0.1), r(w, scale=0.1)
    for prefix, w in (("visual.", width), ("", text_width)):
        for i in range(layers):
            sd.update(random_block(r, f"{prefix}transformer.resblocks.{i}.", OPENCLIP_BLOCK, w, 2 * w))
    return sd


# the key stems of a block's (first norm, second norm, packed qkv, attention output, MLP in, MLP out)
OPENCLIP_BLOCK = ("ln_1.", "ln_2.", "attn.in_proj_", "attn.out_proj.", "mlp.c_fc.", "mlp.c_proj.")


def random_block(r, prefix: str, stems: tuple[str, ...], width: int, hidden: int) -> dict[str, torch.Tensor]:
    """Random weights of a pre-norm transformer block (``r(*shape, scale)`` draws them): two layer
    norms near the identity, packed qkv, the attention output and an MLP of ``hidden`` units. A key
    is ``prefix + stem + "weight"`` or ``"bias"``, with ``stems`` in the order of OPENCLIP_BLOCK."""
    w = width
    tensors = [1 + r(w, scale=0.1), r(w, scale=0.1), 1 + r(w, scale=0.1), r(w, scale=0.1), r(3 * w, w), r(3 * w),
               r(w, w), r(w), r(hidden, w), r(hidden), r(w, hidden), r(w)]
    keys = [prefix + stem + kind for stem in stems for kind in ("weight", "bias")]
    return dict(zip(keys, tensors, strict=True))


def reference_blocks(x, sd, prefix, heads, causal):
    """OpenCLIP's residual attention blocks written out with torch's packed-qkv attention ([B, L, W])."""
    width, length = x.shape[-1], x.shape[1]
    mask = torch.full((length, length), float("-inf"), dtype=x.dtype).triu(1) if causal else None
    i = 0
    while f"{prefix}transformer.resblocks.{i}.ln_1.weight" in sd:
        p = f"{prefix}transformer.resblocks.{i}."
        h = F.layer_norm(x, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"]).transpose(0, 1)
        a, _ = F.multi_head_attention_forward(
            h, h, h, width, heads, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], None, None, False,
            0.0, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], training=False, need_weights=False,
            attn_mask=mask)
        x = x + a.transpose(0, 1)
        h = F.layer_norm(x, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        x = x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                         sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        i += 1
    return x


def reference_image(sd, pixels, heads):
    w = sd["visual.conv1.weight"]
    x = F.conv2d(pixels, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    class_token = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([class_token, x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, x.shape[-1:], sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = reference_blocks(x, sd, "visual.", heads, causal=False)
    pooled = F.layer_norm(x[:, 0], x.shape[-1:], sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
    return pooled @ sd["visual.proj"]


def reference_text(sd, ids, heads):
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    x = reference_blocks(x, sd, "", heads, causal=True)
    x = F.layer_norm(x, x.shape[-1:], sd["ln_final.weight"], sd["ln_final.bias"])
    return x[torch.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]  # pooled at end-of-text (highest id)


def test_openclip_checkpoint_converts_to_clipmodel_with_identical_embeddings():
    sd = openclip_state_dict()
    model = cm.load_openclip_checkpoint(sd, vision_heads=4, text_heads=2)
    assert model.config.vision_config.image_size == 32 and model.config.projection_dim == 24
    # float64 on both sides: the two compute attention in different orders of operations
    model, sd = model.double(), {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    eot = 49  # the end-of-text token is the vocabulary's last id, as in CLIP's BPE
    ids = torch.tensor([[0, 5, 7, eot] + [0] * 12, [0, 9, 3, 11, 2, eot] + [0] * 10])
    with torch.no_grad():
        ours_image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        ours_text = model.text_projection(model.text_model(input_ids=ids).pooler_output)
        assert torch.allclose(ours_image, reference_image(sd, pixels, heads=4), rtol=1e-9, atol=1e-9)
        assert torch.allclose(ours_text, reference_text(sd, ids, heads=2), rtol=1e-9, atol=1e-9)
    assert model.logit_scale.item() == pytest.approx(4.6052)


def test_openclip_converter_refuses_unknown_keys():
    sd = openclip_state_dict()
    sd["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(32)  # a layer-scale this converter does not map
    with pytest.raises(KeyError, match="ls_1"):
        cm.openclip_to_transformers(sd)
    with pytest.raises(KeyError, match="not a ViT"):
        cm.openclip_to_transformers({"visual.trunk.stem.weight": torch.ones(1)})


def test_hpsv2_loads_a_checkpoint_file_through_the_real_loader(tiny_clip, tmp_path):
    # DDP-saved form, as the HPS checkpoints are: {"state_dict": {"module.…": …}}
    from mvsdi.priors.tiny import character_vocab

    vocab = len(character_vocab())  # the tiny tokenizer's ids must fit the embedding table
    sd = {f"module.{k}": v.half() for k, v in openclip_state_dict(vocab=vocab, context=77).items()}
    torch.save({"state_dict": sd}, tmp_path / "hps.pt")
    scorer = cm.load_hpsv2(str(tmp_path / "hps.pt"), str(tiny_clip))
    values = cm.clip_score(scorer.embed_images(torch.rand(2, 3, 48, 48)), scorer.embed_texts(["a cat"])[0])
    assert values.shape == (2,) and torch.all(values.abs() <= 1)
    with pytest.raises(cm.MetricLoadError, match="--hpsv2"):
        cm.load_hpsv2(str(tmp_path / "absent.pt"), str(tiny_clip))


# ---------------------------------------------------------------------------------------------
# divergence


def test_divergence_rule():
    black = [torch.zeros(3, 8, 8)] * 10
    grey = [torch.full((3, 8, 8), 0.5)] * 10  # std 0
    good = [torch.rand(3, 8, 8) * 0.5 + 0.25 for _ in range(10)]
    assert check_divergence(None).diverged and check_divergence(None).reason == "run missing"
    assert check_divergence(black).diverged and check_divergence(grey).diverged
    assert not check_divergence(good).diverged
    few = check_divergence(good[:4])
    assert few.diverged and "fewer than 5" in few.reason
    assert not check_divergence(good[:5]).diverged
    assert not check_divergence(good[:5] + black[:5]).diverged  # exactly half degenerate: not diverged
    assert check_divergence(good[:4] + black[:6]).diverged
    assert check_divergence(good[:4] + black[:6]).degenerate_views == 6


def test_degenerate_view_thresholds():
    dim = torch.rand(3, 16, 16) * (2 * MEAN_FLOOR * 0.9)  # mean just under the floor, std above
    assert is_degenerate(dim)
    flat = torch.full((3, 16, 16), 0.5)
    flat[0, 0, 0] = 0.5 + STD_FLOOR  # a single odd pixel keeps the std far under the floor
    assert is_degenerate(flat)
    assert not is_degenerate(torch.linspace(0, 1, 3 * 16 * 16).reshape(3, 16, 16))


# ---------------------------------------------------------------------------------------------
# inputs


def test_prompt_lists(tmp_path):
    assert len(run_folder.benchmark_prompts()) == 43
    bad = tmp_path / "p.txt"
    bad.write_text("a cat\n\na dog\n  \n")
    with pytest.raises(ValueError, match=r"blank line\(s\) \[2, 4\]"):
        run_folder.read_prompt_file(bad)
    bad.write_text("a cat\na dog\nA  Cat\n")
    with pytest.raises(ValueError, match="line 3 repeats line 1"):
        run_folder.read_prompt_file(bad)
    with pytest.raises(ValueError, match="cannot read"):
        run_folder.read_prompt_file(tmp_path / "none.txt")
    assert run_folder.candidate_prompts(["A cat", "a frog"], ["a cat", "a dog"]) == ["A cat", "a frog", "a dog"]


def test_unknown_metric_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown metric.*'clipscore'.*clip_score, r_precision"):
        runs.parse_metrics("clip_score,clipscore")
    assert runs.parse_metrics(" janus ,janus,divergence") == ("janus", "divergence")


# ---------------------------------------------------------------------------------------------
# run directories end to end through the CLI


def test_eval_end_to_end(tiny_clip, tmp_path, capsys):
    good = make_run(tmp_path, "good", "a ripe strawberry", textured(8))
    dark = make_run(tmp_path, "dark", "a red apple", [np.zeros((32, 32, 3))] * 8)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a wooden chair\na blue teapot\n")
    code, out, err = eval_cli([str(good), str(dark), str(tmp_path / "never-finished"), "--prompts", str(prompts),
                               "--clip-b32", str(tiny_clip), "--clip-b16", str(tiny_clip), "--device", "cpu"], capsys)
    assert code == 0, err
    assert "never-finished: missing" in out and "DIVERGED" in out
    assert not (tmp_path / "never-finished").exists()
    result = json.loads((good / "metrics.json").read_text())
    m = result["metrics"]
    assert result["prompt"] == "a ripe strawberry" and result["views"] == 8 and not result["divergence"]["diverged"]
    assert len(m["clip_score"]["per_view"]) == 8 and -1 <= m["clip_score"]["mean"] <= 1
    assert m["clip_score"]["mean"] == pytest.approx(np.mean(m["clip_score"]["per_view"]), abs=1e-6)
    assert m["r_precision"]["candidates"] == 4 and set(m["r_precision"]["per_view"]) <= {0.0, 1.0}
    assert set(m["clip_iqa"]) >= {"quality", "sharpness", "real"}
    assert all(0 <= v <= 1 for k in ("quality", "sharpness", "real") for v in m["clip_iqa"][k]["per_view"])
    assert (m["janus"]["front_view"], m["janus"]["back_view"]) == (0, 4) and -1 <= m["janus"]["value"] <= 1
    # the Janus score is the cosine of views 0 and V/2 by the same model
    scorer = cm.ClipScorer.load(str(tiny_clip), "t", "--clip-b32")
    imgs = run_folder.load_images([good / "renders" / "000.png", good / "renders" / "004.png"])
    e = scorer.embed_images(torch.stack(imgs))
    assert m["janus"]["value"] == pytest.approx(cm.janus_score(e[0], e[1]), abs=1e-5)
    dark_result = json.loads((dark / "metrics.json").read_text())
    assert dark_result["divergence"]["diverged"] and dark_result["divergence"]["degenerate_views"] == 8

    # a later run of one metric keeps the others
    code, _, err = eval_cli([str(good), "--metrics", "divergence", "--clip-b32", str(tiny_clip)], capsys)
    assert code == 0, err
    assert set(json.loads((good / "metrics.json").read_text())["metrics"]) >= {"clip_score", "janus"}
    assert not list(good.glob(".metrics.json*"))  # atomic write left no temporary behind


def test_eval_bad_inputs(tiny_clip, tmp_path, capsys):
    old = make_run(tmp_path, "old", "a cat", textured(5), version="0.0.9")
    flags = ["--clip-b32", str(tiny_clip), "--clip-b16", str(tiny_clip), "--metrics", "clip_score"]
    code, _, err = eval_cli([str(old), *flags], capsys)
    assert code == 2 and "written by mvsdi 0.0.9" in err and "--force" in err
    assert eval_cli([str(old), *flags, "--force"], capsys)[0] == 0

    code, _, err = eval_cli([str(old), "--metrics", "clip_score,fid", "--force"], capsys)
    assert code == 2 and "unknown metric" in err and "image_reward" in err

    (tmp_path / "notarun").mkdir()
    code, _, err = eval_cli([str(tmp_path / "notarun")], capsys)
    assert code == 2 and "config.json" in err

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n\n")
    code, _, err = eval_cli([str(old), "--force", "--prompts", str(prompts)], capsys)
    assert code == 2 and "blank line(s) [2]" in err

    # a local model path that does not exist fails before any model loads (the CLIP path here is bogus too)
    for metric, flag in (("image_reward", "--image-reward"), ("hpsv2", "--hpsv2")):
        code, _, err = eval_cli([str(old), "--force", "--metrics", f"clip_score,{metric}", "--clip-b32", "x/y/z",
                                 flag, str(tmp_path / "absent")], capsys)
        assert code == 2 and f"for {metric} from" in err and f"{flag} PATH" in err and "absent" in err

    code, _, err = eval_cli([str(old), "--force", "--clip-b32", str(tmp_path / "no-model")], capsys)
    assert code == 2 and "--clip-b32" in err and "no such folder" in err
    metrics_file = old / "metrics.json"
    assert not metrics_file.exists() or "clip_score" in json.loads(metrics_file.read_text())["metrics"]


def test_fewer_views_than_configured_janus_reports_why(tiny_clip, tmp_path, capsys):
    run = make_run(tmp_path, "partial", "a cat", textured(3), eval_views=8)  # views 0..2 of 8
    code, out, err = eval_cli([str(run), "--metrics", "janus,divergence", "--clip-b32", str(tiny_clip)], capsys)
    assert code == 0, err
    result = json.loads((run / "metrics.json").read_text())
    assert result["metrics"]["janus"]["value"] is None and "not both rendered" in result["metrics"]["janus"]["reason"]
    assert result["divergence"]["diverged"] and "only 3 renders" in result["divergence"]["reason"]
