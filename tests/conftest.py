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
