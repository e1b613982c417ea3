"""The frame autoencoder and the latent-space world model: shapes, errors, checkpoints, its
trainer (learns, resumes), and a latent model end to end (loss, step API, engine, trainer)."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from ssm_gym.maze.dataset import save_episode
from ssm_gym.maze.record import record_episodes
from ssm_gym.model import WorldModel, WorldModelConfig, diffusion_forcing_loss
from ssm_gym.model.autoencoder import FrameAutoencoder
from ssm_gym.model.checkpoint import CheckpointError, load_autoencoder, load_model, save_autoencoder, save_model
from ssm_gym.model.diffusion import frames_to_float
from ssm_gym.rollout.engine import RolloutEngine
from ssm_gym.train.autoencoder import AutoencoderTrainConfig, reconstruction_psnr, set_latent_scale, train_autoencoder
from ssm_gym.train.config import PRESETS
from ssm_gym.train.trainer import train

LATENT = {"latent_channels": 4, "latent_downsample": 4, "latent_width": 4, "patch_size": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for folder, seeds in (("train", range(4)), ("val", range(100, 102))):
        for s, ep in zip(seeds, record_episodes(list(seeds), ["explore"] * len(seeds), steps=40)):
            save_episode(root / folder / f"ep_{s:06d}.npz", ep)
    return root


def frames(n=6, size=64, seed=0):
    return torch.randint(0, 256, (n, size, size, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def ae_config(data, out, **kw):
    base = dict(data_dir=data / "train", val_dir=data / "val", out_dir=out, latent_channels=4, width=4,
                batch_size=8, steps=60, lr=3e-3, warmup_steps=5, log_every=10, ckpt_every=20, val_frames=32)
    base.update(kw)
    return AutoencoderTrainConfig(**base)


def test_shapes_layout_and_bad_input():
    ae = FrameAutoencoder(latent_channels=8, downsample=4, width=4)
    x = frames_to_float(frames()).reshape(2, 3, 64, 64, 3)  # any leading dims
    z = ae.encode(x)
    assert z.shape == (2, 3, 16, 16, 8)
    assert ae.decode(z).shape == x.shape
    # channels-last per frame: a frame's latent does not depend on the other frames of the batch
    assert torch.allclose(ae.encode(x[:1, :1]), z[:1, :1], atol=1e-5)
    with pytest.raises(ValueError, match="frames must be"):
        ae.encode(torch.zeros(2, 3, 64, 64))  # channels-first
    with pytest.raises(ValueError, match="divisible by 4"):
        ae.encode(torch.zeros(1, 30, 30, 3))
    with pytest.raises(ValueError, match="latents must be"):
        ae.decode(torch.zeros(1, 16, 16, 3))
    with pytest.raises(ValueError, match="power of 2"):
        FrameAutoencoder(downsample=3)


def test_latent_scale_gives_sigma_data():
    ae = FrameAutoencoder(latent_channels=4, width=4)
    f = frames(32)
    scale = set_latent_scale(ae, f, 0.5)
    assert scale > 0 and abs(ae.encode(frames_to_float(f)).std().item() - 0.5) < 1e-3
    # decode undoes the scale: the reconstruction does not depend on it
    with torch.no_grad():
        a = ae(frames_to_float(f[:2]))
        ae.latent_scale.fill_(3.0)
        assert torch.allclose(ae(frames_to_float(f[:2])), a, atol=1e-5)


def test_checkpoint_roundtrip_and_clear_errors(tmp_path):
    ae = FrameAutoencoder(latent_channels=4, width=4)
    ae.latent_scale.fill_(0.7)
    save_autoencoder(tmp_path / "ae", ae, meta={"note": 1})
    back = load_autoencoder(tmp_path / "ae")
    x = frames_to_float(frames(2))
    assert torch.equal(back.encode(x), ae.encode(x)) and float(back.latent_scale) == pytest.approx(0.7)
    with pytest.raises(CheckpointError, match="autoencoder folder not found"):
        load_autoencoder(tmp_path / "nothing")
    w = tmp_path / "ae" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_autoencoder(tmp_path / "ae")
    save_model(tmp_path / "wm", WorldModel(WorldModelConfig(d_model=32, n_layers=1, n_heads=2)))
    with pytest.raises(CheckpointError, match="not an ssm-gym autoencoder"):
        load_autoencoder(tmp_path / "wm")
    save_autoencoder(tmp_path / "ae2", ae)
    cfg = tmp_path / "ae2" / "config.json"
    doc = json.loads(cfg.read_text())
    doc["model"]["width"] = 8
    cfg.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="weights do not match"):
        load_autoencoder(tmp_path / "ae2")


def test_trainer_learns_and_resumes(data, tmp_path):
    ae_config(data, tmp_path / "x").validate()
    if not torch.cuda.is_available():  # a device this machine lacks fails before any run folder is made
        with pytest.raises(ValueError, match="CUDA is not available"):
            train_autoencoder(ae_config(data, tmp_path / "gpu", device="cuda"))
        assert not (tmp_path / "gpu").exists()
    torch.manual_seed(ae_config(data, tmp_path).seed)  # the run's own starting weights (it seeds the same way)
    untrained = FrameAutoencoder(latent_channels=4, width=4).eval()
    from ssm_gym.train.autoencoder import validation_frames

    val = validation_frames(data / "val", 32)
    out = train_autoencoder(ae_config(data, tmp_path / "run"))
    ae = load_autoencoder(out)
    meta = json.loads((out / "config.json").read_text())["meta"]
    assert meta["step"] == 60 and meta["val_psnr"] == pytest.approx(reconstruction_psnr(ae, val), abs=1e-6)
    assert meta["val_psnr"] > reconstruction_psnr(untrained, val) + 3.0
    with pytest.raises(FileExistsError, match="--resume"):
        train_autoencoder(ae_config(data, tmp_path / "run"))
    with pytest.raises(ValueError, match="lr"):
        train_autoencoder(ae_config(data, tmp_path / "run", lr=1e-3, resume=True))
    # a run killed after its step-40 checkpoint resumes there and ends exactly as the uninterrupted one
    import ssm_gym.train.autoencoder as trainer

    save = trainer._save_checkpoint

    def killed_after_40(cfg, ae, opt, rng, step, *rest):
        save(cfg, ae, opt, rng, step, *rest)
        if step == 40:
            raise KeyboardInterrupt

    trainer._save_checkpoint = killed_after_40
    try:
        with pytest.raises(KeyboardInterrupt):
            train_autoencoder(ae_config(data, tmp_path / "killed"))
    finally:
        trainer._save_checkpoint = save
    assert not (tmp_path / "killed" / "model").exists()
    resumed = load_autoencoder(train_autoencoder(ae_config(data, tmp_path / "killed", resume=True)))
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in ae.state_dict().items())
    rows = (tmp_path / "killed" / "metrics.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [10, 20, 30, 40, 50, 60]


# -- the latent-space world model ---------------------------------------------------------------
def latent_model(seed=0, **kw):
    torch.manual_seed(seed)
    m = WorldModel(dataclasses.replace(PRESETS["tiny"][1].model, **LATENT, **kw)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if (p == 0).all():
                p.normal_(0, 0.2)
        m.codec.latent_scale.fill_(0.8)
    return m


def test_latent_model_config_and_errors():
    cfg = WorldModelConfig(**LATENT)
    assert cfg.space_shape == (16, 16, 4) and cfg.grid == (8, 8)
    with pytest.raises(ValueError, match="patch_size 32 must divide the latent size 16"):
        WorldModelConfig(latent_channels=4, patch_size=32)
    m = latent_model()
    assert not any(p.requires_grad for p in m.codec.parameters())
    with pytest.raises(ValueError, match=r"expected frames \(\.\.\., 64, 64, 3\) or latents \(\.\.\., 16, 16, 4\)"):
        m.to_space(torch.zeros(1, 1, 32, 32, 3))
    assert m.init_state(1, compression="strong").comp is not None  # (compression scores the decoded pixels)


def test_latent_model_parallel_equals_step_and_generate_advances_on_the_latent():
    m = latent_model()
    f = frames(2 * 5).reshape(2, 5, 64, 64, 3)
    actions = torch.randint(0, 6, (2, 5), generator=torch.Generator().manual_seed(1))
    actions[:, 0] = m.START
    with torch.no_grad():
        par = m(f, torch.zeros(2, 5), actions)
    state = m.init_state(2)
    steps = [m.observe(state, f[:, i], actions[:, i]) for i in range(5)]
    assert (torch.cat([s.raw for s in steps], 1) - par.raw).abs().max() < 1e-4
    # generate = sample a latent, return it decoded, advance the state on the latent itself
    noise = torch.randn((2, 1, 16, 16, 4), generator=torch.Generator().manual_seed(2))
    a = torch.tensor([1, 4])
    x, expected = m._sample(state.clone(), a, 2, None, noise, None)
    before = state.clone()
    frame, _, _ = m.generate(state, a, steps=2, noise=noise)
    assert frame.dtype == torch.uint8 and frame.shape == (2, 64, 64, 3)
    assert torch.equal(frame, m.to_frames(x)[:, 0])
    p_frame, p_expected = m.predict(before.clone(), a, steps=2, noise=noise)
    assert torch.equal(p_frame, frame) and torch.equal(p_expected, expected)
    m.observe(before, x[:, 0], a)
    o1, o2 = m.observe(state, f[:, 0], actions[:, 1]), m.observe(before, f[:, 0], actions[:, 1])
    assert (o1.raw - o2.raw).abs().max() < 1e-6


def test_latent_loss_trains_the_network_not_the_autoencoder():
    m = latent_model().train()
    f = frames(2 * 6).reshape(2, 6, 64, 64, 3)
    actions = torch.randint(0, 6, (2, 6), generator=torch.Generator().manual_seed(1))
    codec = {k: v.clone() for k, v in m.codec.state_dict().items()}
    for copies in (False, True):
        loss, stats = diffusion_forcing_loss(m, f, actions, rewards=torch.zeros(2, 6), noised_copies=copies,
                                             generator=torch.Generator().manual_seed(0))
        loss.backward()
        assert math.isfinite(stats["loss"])
        assert all(p.grad is None for p in m.codec.parameters())
        assert m.patch_in.weight.grad is not None and m.patch_in.weight.grad.abs().sum() > 0
    assert all(torch.equal(v, m.codec.state_dict()[k]) for k, v in codec.items())


def test_latent_checkpoint_and_engine(tmp_path):
    m = latent_model()
    save_model(tmp_path / "wm", m)
    back = load_model(tmp_path / "wm")
    assert float(back.codec.latent_scale) == pytest.approx(0.8)
    eng = RolloutEngine(back, 3, seed=0)
    first = eng.reset(torch.ones(3, dtype=torch.bool), frames(3))
    assert first.shape == (3, 64, 64, 3)
    out = eng.step(torch.tensor([1, 2, 3]))
    assert out[0].shape == (3, 64, 64, 3) and out[0].dtype == torch.uint8
    again = RolloutEngine(load_model(tmp_path / "wm"), 3, seed=0)
    again.reset(torch.ones(3, dtype=torch.bool), frames(3))
    assert torch.equal(again.step(torch.tensor([1, 2, 3]))[0], out[0])  # deterministic for a seed


def test_trainer_builds_a_latent_model_from_an_autoencoder(data, tmp_path):
    ae = FrameAutoencoder(latent_channels=4, width=4)
    ae.latent_scale.fill_(0.6)
    save_autoencoder(tmp_path / "ae", ae)
    base = dataclasses.replace(PRESETS["tiny"][1], data_dir=data / "train", val_dir=data / "val",
                               model=dataclasses.replace(PRESETS["tiny"][1].model, **LATENT))
    with pytest.raises(ValueError, match="exactly one of --autoencoder"):
        dataclasses.replace(base, out_dir=tmp_path / "a").validate()
    with pytest.raises(ValueError, match="pixel space|latent-channels"):
        train(dataclasses.replace(PRESETS["tiny"][1], data_dir=data / "train", out_dir=tmp_path / "b",
                                  autoencoder=tmp_path / "ae"))
    wide = dataclasses.replace(base, out_dir=tmp_path / "c", autoencoder=tmp_path / "ae",
                               model=dataclasses.replace(base.model, latent_width=8))
    with pytest.raises(ValueError, match="width 4 vs 8"):
        train(wide)
    final = train(dataclasses.replace(base, out_dir=tmp_path / "run", autoencoder=tmp_path / "ae"))
    model = load_model(final)
    assert all(torch.equal(v, model.codec.state_dict()[k]) for k, v in ae.state_dict().items())
    rows = [r.split(",") for r in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]]
    assert all(np.isfinite(float(r[4])) for r in rows)
    val = (tmp_path / "run" / "val.csv").read_text().splitlines()
    assert len(val) > 1  # validation ran through decode: PSNR of pixel frames


def test_object_loss_weights_and_the_weighted_frame_loss():
    """The weights cover the latent pixels over a ball's pixels; uniform weights give the plain
    loss; a weighted loss is the weighted mean of the per-position errors (by hand)."""
    from ssm_gym.maze.render import object_mask
    from ssm_gym.maze.sim import MazeBatch
    from ssm_gym.model.diffusion import object_loss_weights

    sim = MazeBatch(16, n_objects=6)
    for i in range(16):
        sim.reset_env(i, np.random.default_rng(100 + i))
    f = torch.from_numpy(np.stack([sim.render(), sim.render()], 1))  # (16, 2, 64, 64, 3)
    m = latent_model().train()
    w = object_loss_weights(m.config, f, 9.0)
    assert w.shape == (16, 2, 16, 16) and set(w.unique().tolist()) <= {1.0, 10.0}
    ball = torch.from_numpy(object_mask(f.numpy()))
    assert (w > 1).any() and torch.equal(w > 1, ball.unflatten(2, (16, 4)).unflatten(4, (16, 4)).any(5).any(3))
    pixel = object_loss_weights(PRESETS["tiny"][1].model, f, 2.0)
    assert torch.equal(pixel, 1.0 + 2.0 * ball.float())
    actions = torch.randint(0, 6, (16, 2), generator=torch.Generator().manual_seed(1))
    sigma = torch.full((16, 2), 0.7)

    def loss(**kw):
        return diffusion_forcing_loss(m, f, actions, sigma=sigma, generator=torch.Generator().manual_seed(0), **kw)[0]

    plain = loss()
    for c in (1.0, 3.0):  # a weighted mean: any uniform weight is the plain loss
        torch.testing.assert_close(loss(space_weight=torch.full((16, 2, 16, 16), c)), plain)
    # the weighted mean by hand: halves of frame (0, 0) weighted 3 : 1 give 3/4 of one half's
    # loss plus 1/4 of the other's, the two halves alone average to the plain loss
    left, right = torch.ones(16, 2, 16, 16), torch.ones(16, 2, 16, 16)
    left[0, 0, :, 8:] = 0.0
    right[0, 0, :, :8] = 0.0
    l_left, l_right = loss(space_weight=left), loss(space_weight=right)
    assert not torch.allclose(l_left, l_right)
    torch.testing.assert_close((l_left + l_right) / 2, plain)
    torch.testing.assert_close(loss(space_weight=3 * left + right), (3 * l_left + l_right) / 4)
    assert torch.isfinite(loss(space_weight=w))
    for bad in (-torch.ones(16, 2, 16, 16), torch.zeros(16, 2, 16, 16)):
        with pytest.raises(ValueError, match="positive sum"):
            loss(space_weight=bad)
    with pytest.raises(ValueError, match="space_weight"):
        loss(space_weight=torch.ones(16, 2, 8, 8))
    with pytest.raises(TypeError, match="uint8"):
        object_loss_weights(m.config, f.float(), 1.0)
