import os

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run (CI must not pass or fail by chance);
# HYPOTHESIS_PROFILE=explore draws new ones, to look for failures while developing.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Tests use tiny tensors, and on a busy 2-core machine several threads per process make OpenMP
# spin-wait (10x slower): one thread here and in the subprocesses the tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_random_model(seed: int, **options):
    """The tiny preset's model (with ``options`` switched on), randomly initialised, with non-zero
    output layers so that frames depend on the input (plumbing tests do not need a trained model)."""
    import dataclasses

    from ssm_gym.model.world_model import WorldModel
    from ssm_gym.train.config import PRESETS

    torch.manual_seed(seed)
    m = WorldModel(dataclasses.replace(PRESETS["tiny"][1].model, **options)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


@pytest.fixture(scope="module")
def model():
    return _tiny_random_model(0)


@pytest.fixture(scope="module")
def prev_frame_model():
    """As ``model``, with the previous-frame input switched on (and non-zero)."""
    return _tiny_random_model(1, prev_frame=True)


@pytest.fixture(scope="module")
def latent_model():
    """As ``model``, in a latent space: 64x64x3 frames -> 16x16x4 latents (an untrained
    autoencoder), 2x2 latent patches, so the same 8x8 token grid (each token covers 8x8 pixels)."""
    return _tiny_random_model(3, latent_channels=4, latent_width=4, patch_size=2)


@pytest.fixture(scope="module")
def null_action_model():
    """As ``model``, with the null action (for action guidance), its embedding non-zero."""
    return _tiny_random_model(2, null_action=True)


@pytest.fixture(scope="module")
def tiny_checkpoint(model, tmp_path_factory):
    """The ``model`` fixture saved as a checkpoint folder (for CLIs and benchmarks)."""
    from ssm_gym.model.checkpoint import save_model

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_model(path, model)
    return path


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """A folder of three short recorded episodes (other lengths than the contexts drawn from them)."""
    from ssm_gym.maze.dataset import save_episode
    from ssm_gym.maze.record import record_episodes

    folder = tmp_path_factory.mktemp("data")
    for i, ep in enumerate(record_episodes([21, 22, 23], ["explore", "oracle", "random"], steps=30)):
        save_episode(folder / f"ep_{i:06d}.npz", ep)
    return folder


@pytest.fixture(scope="session")
def touches_data(tmp_path_factory):
    """Two recorded episodes of the oracle policy, which touches targets often (reward tests)."""
    from ssm_gym.maze.dataset import save_episode
    from ssm_gym.maze.record import record_episodes

    folder = tmp_path_factory.mktemp("touches")
    for i, ep in enumerate(record_episodes([5, 6], ["oracle", "oracle"], steps=120)):
        save_episode(folder / f"ep_{i:06d}.npz", ep)
    return folder
