"""The CUDA path (pure-PyTorch backend on a GPU): same numbers as on the CPU, the engine and a
training run work there. Skipped without a GPU (`pytest -m cuda` on a machine with one)."""

import dataclasses

import pytest
import torch

from ssm_gym.model import HAS_MAMBA_SSM, VARIANTS, diffusion_forcing_loss
from ssm_gym.rollout.engine import RolloutEngine
from tests.test_world_model import clip, max_err, randomized, tiny_config, variant_model

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(autouse=True)
def exact_fp32():
    """Plain fp32 matmuls on the GPU (no TF32), so CPU and GPU can be compared tightly."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("variant", [*VARIANTS, "full+latent"])
def test_gpu_forward_and_step_equal_cpu(variant):
    _, m = variant_model(variant)
    frames, actions = clip()
    with torch.no_grad():
        cpu = m(frames, torch.zeros(2, frames.shape[1]), actions)
        g = m.cuda()
        gpu = g(frames.cuda(), torch.zeros(2, frames.shape[1], device="cuda"), actions.cuda())
        state = g.init_state(2, "cuda")
        steps = [g.observe(state, frames[:, i].cuda(), actions[:, i].cuda()) for i in range(frames.shape[1])]
    assert max_err(gpu.raw.cpu(), cpu.raw) < 1e-4
    assert max_err(torch.cat([s.raw for s in steps], 1).cpu(), cpu.raw) < 1e-4


@pytest.mark.skipif(not HAS_MAMBA_SSM, reason="needs mamba-ssm")
def test_mamba_backend_model_equals_torch_backend():
    """The whole model on mamba-ssm's SSD kernels (what backend="auto" picks on a GPU for chunks of
    16 or more, as in every shipped model): outputs and parameter gradients equal the pure-PyTorch
    scan's on the same GPU. (The tiny models above use chunk 8, so they run the torch path.)"""
    cfg = tiny_config("full", ssm_chunk_size=16, d_state=16)
    frames, actions = clip(t=12)  # scans of 48, 24 and 192 tokens per block: whole and partial chunks
    frames, actions, sigma = frames.cuda(), actions.cuda(), torch.full((2, 12), 0.5, device="cuda")
    outs, grads = {}, {}
    for backend in ("torch", "mamba"):
        m = randomized(dataclasses.replace(cfg, backend=backend)).cuda()
        out = m(frames, sigma, actions).raw
        out.square().mean().backward()
        outs[backend] = out.detach()
        grads[backend] = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
    # Triton's tl.dot may use TF32 whatever torch's flags say: tolerances for ~1e-3 relative products
    out_err = max_err(outs["mamba"], outs["torch"]) / outs["torch"].abs().max().item()
    grad_err = ((grads["mamba"] - grads["torch"]).norm() / grads["torch"].norm()).item()
    print(f"mamba vs torch backend: output max rel err {out_err:.2e}, gradient rel err {grad_err:.2e}")
    assert out_err < 1e-2 and grad_err < 2e-2


@pytest.mark.parametrize("variant", ["full", "attn_full"])
def test_gpu_gradients_equal_cpu(variant):
    m = randomized(tiny_config(variant)).train()
    frames, actions = clip()
    sigma = torch.full((2, frames.shape[1]), 0.5)
    grads = []
    for dev in ("cpu", "cuda"):
        m = m.to(dev)
        m.zero_grad()
        gen = torch.Generator(device=dev).manual_seed(0)
        loss, _, _ = diffusion_forcing_loss(m, frames.to(dev), actions.to(dev), sigma=sigma.to(dev), generator=gen,
                                            return_state=True)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten().cpu() for p in m.parameters() if p.grad is not None]))
    # the noise draws differ between devices, so compare gradient scale and direction, not values
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert torch.isfinite(grads[1]).all() and cos > 0.5


def test_engine_on_gpu_deterministic_and_constant_state():
    m = randomized(tiny_config("full"))
    frames, _ = clip(b=3, t=1)
    outs = []
    for _ in range(2):
        eng = RolloutEngine(m, 3, device="cuda", sampling_steps=2, seed=5)
        eng.reset(torch.ones(3, dtype=torch.bool), frames[:, 0])
        size = eng.state.nbytes()
        seq = [eng.step(torch.tensor([1, 2, 3]))[0].cpu() for _ in range(6)]
        assert eng.state.nbytes() == size
        outs.append(torch.stack(seq))
    assert outs[0].dtype == torch.uint8 and torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("setting", ["strong", "strong-compact"])
def test_compressed_engine_on_gpu_equals_cpu(setting):
    """Token pools (grown and compacted on the GPU, no host round trips in attention) and the
    compact storage: the model's outputs on real frames match the CPU's."""
    m = randomized(tiny_config("full"))
    frames, actions = clip(b=3, t=10)
    frames[:, 6:] = frames[:, 5:6]  # a static stretch: tokens dropped, blocks shrunk
    outs = {}
    for dev in ("cpu", "cuda"):
        eng = RolloutEngine(m.to(dev), 3, device=dev, compression=setting)
        eng.reset(torch.ones(3, dtype=torch.bool), frames[:, 0])
        rewards = []
        for i in range(1, frames.shape[1]):  # teacher-forced: the same frames on both devices
            eng.observe(frames[:, i].to(dev), actions[:, i].to(dev))
            rewards.append(m.to(dev).generate(eng.state, actions[:, i].to(dev), steps=1,
                                              noise=torch.zeros(3, 1, *frames.shape[2:], device=dev))[1].cpu())
        outs[dev] = (torch.stack(rewards), eng.model_state_nbytes_by_part())
    assert max_err(outs["cuda"][0], outs["cpu"][0]) < 1e-3
    assert outs["cuda"][1] == outs["cpu"][1]


def test_tiny_training_run_on_gpu(tmp_path):
    from ssm_gym.maze.dataset import save_episode
    from ssm_gym.maze.record import record_episodes
    from ssm_gym.model.checkpoint import load_model
    from ssm_gym.train.config import PRESETS
    from ssm_gym.train.trainer import train

    for folder, seeds in (("train", range(3)), ("val", range(100, 102))):
        for s, ep in zip(seeds, record_episodes(list(seeds), ["explore"] * len(seeds), steps=30)):
            save_episode(tmp_path / folder / f"ep_{s:06d}.npz", ep)
    cfg = dataclasses.replace(PRESETS["tiny"][1], data_dir=tmp_path / "train", val_dir=tmp_path / "val",
                              out_dir=tmp_path / "run", device="cuda")
    model = load_model(train(cfg))  # loads on the CPU: checkpoints are device-free
    assert next(model.parameters()).device.type == "cpu"


def test_latent_training_on_gpu(tmp_path):
    """The autoencoder's trainer and a latent-space world model's training run on the GPU; the
    checkpoint loads on the CPU with the autoencoder inside."""
    from ssm_gym.maze.dataset import save_episode
    from ssm_gym.maze.record import record_episodes
    from ssm_gym.model.checkpoint import load_model
    from ssm_gym.train.autoencoder import AutoencoderTrainConfig, train_autoencoder
    from ssm_gym.train.config import PRESETS
    from ssm_gym.train.trainer import train

    for folder, seeds in (("train", range(3)), ("val", range(100, 102))):
        for s, ep in zip(seeds, record_episodes(list(seeds), ["explore"] * len(seeds), steps=30)):
            save_episode(tmp_path / folder / f"ep_{s:06d}.npz", ep)
    ae = train_autoencoder(AutoencoderTrainConfig(
        data_dir=tmp_path / "train", val_dir=tmp_path / "val", out_dir=tmp_path / "ae", latent_channels=4, width=4,
        batch_size=8, steps=20, warmup_steps=2, log_every=10, ckpt_every=10, val_frames=16, device="cuda"))
    state = torch.load(tmp_path / "ae" / "checkpoints" / "train_state.pt", weights_only=False)
    assert state["cuda_rng"] is not None  # it trained on the GPU
    base = PRESETS["tiny"][1]
    cfg = dataclasses.replace(base, data_dir=tmp_path / "train", val_dir=tmp_path / "val", out_dir=tmp_path / "run",
                              device="cuda", autoencoder=ae,
                              model=dataclasses.replace(base.model, latent_channels=4, latent_width=4, patch_size=2))
    model = load_model(train(cfg))
    assert next(model.parameters()).device.type == "cpu" and model.codec is not None


def test_context_reset_and_vector_env_on_gpu():
    import gymnasium as gym
    import numpy as np

    import ssm_gym  # noqa: F401
    from ssm_gym.model import WorldModel
    from ssm_gym.train.config import PRESETS

    torch.manual_seed(0)
    model = WorldModel(PRESETS["tiny"][1].model)
    venv = gym.make_vec("SSMWorld-Maze-v0", num_envs=3, model=model, device="cuda", max_episode_steps=5)
    obs, _ = venv.reset(seed=0)
    for _ in range(7):
        obs, rew, term, trunc, _ = venv.step(np.array([1, 2, 3]))
    assert obs.shape == (3, 64, 64, 3) and obs.dtype == np.uint8 and np.isfinite(rew).all()
    eng = RolloutEngine(model, 2, device="cuda")
    ctx = torch.from_numpy(np.stack([obs[:2]] * 4, 1))  # (2, 4, 64, 64, 3)
    eng.reset(torch.ones(2, dtype=torch.bool), ctx, torch.ones(2, 3, dtype=torch.long))
    assert eng.step(torch.tensor([0, 1]))[0].device.type == "cuda"


@pytest.mark.parametrize("steps,spec", [(1, "full"), (2, "full"), (2, "full+latent")])
def test_cuda_graph_step_equals_eager(steps, spec):
    """The CUDA-graph step gives the eager step's frames, rewards and terminations, across resets
    (in place: the graph is kept) and a replaced state (the graph is captured again); for a latent
    model the decoder runs inside the graph."""
    _, m = variant_model(spec)
    frames, actions = clip(b=3, t=4)
    outs = []
    for graph in (False, True):
        eng = RolloutEngine(m, 3, device="cuda", sampling_steps=steps, seed=7, cuda_graph=graph)
        eng.reset(torch.ones(3, dtype=torch.bool), frames[:, 0])
        seq = []
        for i in range(8):
            if i == 4:  # reset two envs on real context: in place, the captured graph still applies
                eng.reset(torch.tensor([True, False, True]), frames[:2].cuda(), actions[:2, 1:].cuda())
            if i == 6:
                eng.state = eng.state.clone()  # new tensors: captured again
            f, r, d = eng.step(torch.tensor([1, 2, 3]) + i % 3)
            seq.append((f.cpu().clone(), r.cpu(), d.cpu()))
        if graph:
            assert eng._graph is not None and eng._graph.graph is not None
        outs.append(seq)
    for (fe, re, de), (fg, rg, dg) in zip(*outs):
        assert (fe.int() - fg.int()).abs().max() <= 1 and (fe != fg).float().mean() < 1e-3
        assert max_err(rg, re) < 1e-4 and torch.equal(dg, de)
