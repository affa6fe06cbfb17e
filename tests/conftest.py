import os

# Tests never reach a model hub: every model is built in code.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Spin-waiting OpenMP threads make torch ~50x slower on a 2-core machine with any other load.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    """A tiny random SD-shaped stack on disk, in diffusers layout (built once per test session)."""
    from mvsdi.priors.tiny import write_random_stable_diffusion

    return write_random_stable_diffusion(tmp_path_factory.mktemp("tiny-sd"), shape="tiny")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Keep `--model tiny` runs from writing into the user's cache."""
    os.environ["MVSDI_CACHE"] = str(tmp_path_factory.mktemp("mvsdi-cache"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIPModel + character tokenizer saved with save_pretrained (32² images, patch 8)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from mvsdi.priors.tiny import character_vocab

    vocab = character_vocab()
    ids = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
               pad_token_id=vocab["<|endoftext|>"])
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, **ids),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).save_pretrained(folder)
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(folder)
    return folder


@pytest.fixture
def float64():
    """Reference computations in float64: the default dtype (cameras, fields, prompt embeddings) for
    the test's duration. Two computations that differ only in the order of float operations (a batch
    of K vs K batches of one) then agree to ~1e-12 relative, far below any real difference, so no
    CPU's or thread count's float32 rounding can decide the test."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="session")
def tiny_sd_prior64(tiny_sd_folder):
    """The tiny SD stack loaded in float64 (UNet, VAE, text encoder)."""
    from mvsdi.priors.stable_diffusion import StableDiffusionPrior

    return StableDiffusionPrior(str(tiny_sd_folder), device="cpu", dtype=torch.float64)
