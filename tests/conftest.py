import os

import pytest

# Never reach a model hub from the tests: everything runs on tiny local models or shipped weights.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    """The tiny random SDXL + adapter checkpoints, built once per session in a private cache."""
    from fastface.testing import tiny_model_dir

    root = tmp_path_factory.getbasetemp() / "fastface-cache"
    patch = pytest.MonkeyPatch()
    patch.setenv("FASTFACE_CACHE", str(root))
    yield tiny_model_dir(root)
    patch.undo()


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    # The tiny models gain nothing from threads; on a busy 2-core machine several threads only wait
    # on each other (a tiny denoising step then takes seconds instead of milliseconds).
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
