"""Dynamic state compression (ssm_gym/model/compression.py) on a tiny randomly initialised model.

What is checked: compression off (or a rule that keeps everything) is the exact model; the packed
state the engine holds is lossless; the sizes follow the content (a static scene costs fewer bytes
than a changing one); long compressed rollouts stay finite and deterministic; the training masks
equal the inference rule; bad settings fail clearly."""

import dataclasses

import gymnasium as gym
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ssm_gym  # noqa: F401
from ssm_gym.model.compression import (
    NOVEL,
    SETTINGS,
    CompressionConfig,
    clip_compression,
    get_compression,
    pack_state,
    unpack_state,
)
from ssm_gym.model.ssm import BlockwiseSSM
from ssm_gym.model.world_model import WorldModel
from ssm_gym.rollout.engine import RolloutEngine
from ssm_gym.train.config import PRESETS

KEEP_ALL = CompressionConfig("keep-all", kv_threshold=0.0, ssm_fractions=(0.5, 1.0), ssm_thresholds=(-1.0,))


@pytest.fixture(scope="module")
def episode():
    """Real frames and actions of one maze episode (frames[i + 1] follows actions[i])."""
    env = gym.make("SSMWorld-MazeReal-v0")
    obs, _ = env.reset(seed=3)
    frames, actions = [obs], []
    rng = np.random.default_rng(0)
    for _ in range(40):
        a = int(rng.integers(0, 6))
        obs, *_ = env.step(a)
        frames.append(obs), actions.append(a)
    return torch.from_numpy(np.stack(frames)), torch.tensor(actions)


def rollout(model, compression, frames, actions, steps, num_envs=2, seed=0):
    eng = RolloutEngine(model, num_envs, seed=seed, compression=compression)
    eng.reset(torch.ones(num_envs, dtype=torch.bool), frames[None, :8].expand(num_envs, -1, -1, -1, -1),
              actions[None, :7].expand(num_envs, -1))
    out = [eng.step(actions[7 + t % 30].expand(num_envs))[0].clone() for t in range(steps)]
    return torch.stack(out), eng


@pytest.mark.parametrize("which", ["model", "prev_frame_model", "latent_model"])
def test_off_and_keep_all_reproduce_the_exact_model(request, which, episode):
    model = request.getfixturevalue(which)  # (a prev_frame model reads its last frame from compression's)
    frames, actions = episode
    plain, eng = rollout(model, None, frames, actions, 6)
    assert eng.state.comp is None and not eng.packed
    off, _ = rollout(model, "off", frames, actions, 6)
    # a rule that keeps everything runs every masked code path (and packs) yet changes nothing
    kept, eng_kept = rollout(model, KEEP_ALL, frames, actions, 6)
    assert eng_kept.packed
    assert torch.equal(plain, off) and torch.equal(plain, kept)


@pytest.mark.parametrize("setting, which", [("strong", "model"), ("strong-compact", "model"),
                                            ("strong", "prev_frame_model"), ("strong", "latent_model")])
def test_packed_engine_equals_dense_compressed_model(request, which, episode, setting):
    """Packing between steps is lossless (both storages: token pools stepped in place, compact
    tokens rebuilt into a ring): the engine and the model stepped on a dense compressed state give
    identical frames."""
    model = request.getfixturevalue(which)
    frames, actions = episode
    cfg = SETTINGS[setting]
    packed, eng = rollout(model, cfg, frames, actions, 8, num_envs=1)
    state = model.init_state(1, compression=cfg)
    model.observe_clip(state, frames[None, :8], torch.cat([torch.tensor([model.START]), actions[:7]])[None])
    gen = torch.Generator().manual_seed(0)  # the engine's env 0 draws from seed 0 + 0
    dense = []
    for t in range(8):
        noise = torch.randn((1, 1, *model.config.space_shape), generator=gen)
        dense.append(model.generate(state, actions[7 + t].view(1), steps=eng.sampling_steps, noise=noise)[0])
    assert torch.equal(packed[:, 0], torch.cat(dense))
    # and the state itself round-trips
    again = unpack_state(pack_state(state, model.layers))
    for a, b in zip(state.ssm, again.ssm):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for a, b in zip(state.kv, again.kv):
        stored = a.keep & (a.pos >= 0)[..., None]  # (the free slot of the next frame holds scratch)
        has = stored.any(-1)  # a frame none of whose tokens was kept leaves nothing to restore
        assert torch.equal(a.pos[has], b.pos[has]) and ((b.pos[~has] == -1) | (b.pos[~has] == a.pos[~has])).all()
        assert torch.equal(a.k[stored], b.k[stored]) and torch.equal(a.v[stored], b.v[stored])


@pytest.mark.parametrize("which", ["model", "latent_model"])
def test_sizes_follow_content(request, which, episode):
    """A static scene ends with smaller SSM states and fewer cached tokens than a changing one."""
    model = request.getfixturevalue(which)
    frames, actions = episode
    cfg = SETTINGS["strong"]
    static = frames[:1].expand(40, -1, -1, -1)
    sizes = {}
    for name, clip in (("static", static), ("moving", frames[:40])):
        eng = RolloutEngine(model, 1, compression=cfg)
        eng.reset(torch.ones(1, dtype=torch.bool), clip[:1])
        for t in range(1, 40):
            eng.observe(clip[t][None], actions[t - 1].view(1))
        sizes[name] = eng.model_state_nbytes_by_part()
    for part in ("ssm_state", "attention_cache"):
        assert sizes["static"][part] < sizes["moving"][part], part
    # static: the activity has decayed below every threshold, so every block holds its smallest prefix
    d = model.config.d_state
    dense = RolloutEngine(model, 1).model_state_nbytes_by_part()
    assert sizes["static"]["ssm_state"] < dense["ssm_state"] * (cfg.ssm_fractions[0] * 1.5)
    assert sizes["moving"]["ssm_state"] <= dense["ssm_state"] + 64 * d  # + masks


def test_long_compressed_rollout_is_finite_deterministic_and_bounded(model, episode):
    frames, actions = episode
    cfg = SETTINGS["strong-bf16"]
    a, eng_a = rollout(model, cfg, frames, actions, 300)
    b, _ = rollout(model, cfg, frames, actions, 300)
    assert torch.equal(a, b)
    state = eng_a.state
    assert all(torch.isfinite(s[1]).all() for s in state.ssm if s is not None)
    assert all(torch.isfinite(c.k.float()).all() and torch.isfinite(c.v.float()).all() for c in state.kv)
    dense = RolloutEngine(model, 2).state_nbytes()
    assert eng_a.state_nbytes() < dense  # bf16 cache alone halves the largest part


def test_fork_and_reset_keep_compression(model, episode):
    frames, actions = episode
    _, eng = rollout(model, "strong", frames, actions, 5)
    child = eng.fork([1, 1, 0])
    assert child.packed and child.state.comp.act.shape[0] == 3
    assert torch.equal(child.state.comp.act[0], eng.state.comp.act[1])
    eng.reset(torch.tensor([True, False]), frames[:1])
    assert (eng.state.comp.act[0] == NOVEL).all() and int(eng.state.t[0]) == 1
    f1, *_ = child.step(torch.tensor([1, 1, 1]))
    assert torch.isfinite(f1.float()).all()


def test_training_masks_equal_the_inference_rule(episode):
    """clip_compression (training, whole clip) == CompressionState.observe (inference, frame by frame)."""
    frames, _ = episode
    cfg = SETTINGS["strong"]
    clip = clip_compression(cfg, frames[None, :20], patch=8)
    m = WorldModel(PRESETS["tiny"][1].model)
    state = m.init_state(1, compression=cfg)
    for t in range(20):
        masks, after = state.comp.observe(frames[None, t:t + 1], state.t)
        assert torch.equal(masks.kv_keep[:, 0], clip.kv_keep[:, t])
        assert torch.allclose(masks.act[:, 0], clip.act[:, t])
        state.comp.commit(frames[None, t:t + 1], after)
        state.t += 1
    none = clip_compression(cfg, frames[None, :20].expand(4, -1, -1, -1, -1), patch=8, prob=0.0)
    assert none.kv_keep.all() and (none.act == NOVEL).all()


@settings(max_examples=15, deadline=None)
@given(size=st.sampled_from([2, 4, 8]), t=st.integers(1, 6), block=st.sampled_from([(2, 2), (4, 4)]))
def test_ssm_prefix_mask(size, t, block):
    """A constant prefix s leaves the state's dimensions past s at zero, and s = d_state is the
    unmasked layer exactly."""
    torch.manual_seed(size + t)
    layer = BlockwiseSSM(16, (4, 4), block, d_state=8, headdim=8, chunk_size=4)
    x = torch.randn(2, t, 4, 4, 16)
    nb = layer.nblocks
    y_full, (_, s_full) = layer(x)
    y_same, (_, s_same) = layer(x, sizes=torch.full((2, t, nb), 8))
    assert torch.equal(y_full, y_same) and torch.equal(s_full, s_same)
    _, (_, s_cut) = layer(x, sizes=torch.full((2, t, nb), size))
    assert (s_cut[..., size:] == 0).all()


def test_compressed_training_run(tmp_path):
    from ssm_gym.maze.dataset import save_episode
    from ssm_gym.maze.record import record_episodes
    from ssm_gym.model.checkpoint import load_model
    from ssm_gym.train.trainer import train

    for folder, seeds in (("train", range(3)), ("val", range(100, 101))):
        for s, ep in zip(seeds, record_episodes(list(seeds), ["explore"] * len(seeds), steps=20)):
            save_episode(tmp_path / folder / f"ep_{s:06d}.npz", ep)
    cfg = dataclasses.replace(PRESETS["tiny"][1], data_dir=tmp_path / "train", val_dir=tmp_path / "val",
                              out_dir=tmp_path / "run", compression="strong", compression_prob=0.5, stage_steps=(2, 2))
    model = load_model(train(cfg))
    f, *_ = RolloutEngine(model, 1, compression="strong").step(torch.tensor([0]))
    assert f.shape == (1, 64, 64, 3)


def test_latent_model_compression_scores_pixels(latent_model, episode, tmp_path):
    """A latent model's compressed state advances on latents with the decoded pixels scored (a
    clear error without them), and such a model trains with compression (masks on its token grid)."""
    from ssm_gym.model.autoencoder import FrameAutoencoder
    from ssm_gym.model.checkpoint import save_autoencoder
    from ssm_gym.model.checkpoint import load_model
    from ssm_gym.train.trainer import train

    frames, actions = episode
    latents = latent_model.to_space(frames[None, :4])
    a = torch.cat([torch.tensor([latent_model.START]), actions[:3]])[None]
    by_pixels, by_latents = (latent_model.init_state(1, compression="strong") for _ in range(2))
    out_p = latent_model.observe_clip(by_pixels, frames[None, :4], a)
    out_l = latent_model.observe_clip(by_latents, latents, a, pixels=frames[None, :4])
    assert torch.equal(by_pixels.comp.act, by_latents.comp.act) and torch.equal(by_pixels.comp.last, frames[3:4])
    assert torch.equal(out_p.raw, out_l.raw)  # the network saw the same latents and the same masks
    for (_, sp), (_, sl) in zip(by_pixels.ssm, by_latents.ssm):
        assert torch.equal(sp, sl)
    frame, *_ = latent_model.generate(by_latents, torch.tensor([1]), steps=1)
    assert torch.equal(by_latents.comp.last, frame)  # generate scores its own decoded frame
    with pytest.raises(ValueError, match="previous-frame input"):
        WorldModel(dataclasses.replace(latent_model.config, prev_frame=True)).init_state(1, compression="strong")
    with pytest.raises(ValueError, match="pass the decoded frames too"):
        latent_model.observe_clip(latent_model.init_state(1, compression="strong"), latents, a)

    from ssm_gym.maze.dataset import save_episode
    from ssm_gym.maze.record import record_episodes

    for s, ep in zip(range(2), record_episodes([0, 1], ["explore"] * 2, steps=20)):
        save_episode(tmp_path / "train" / f"ep_{s:06d}.npz", ep)
    save_autoencoder(tmp_path / "ae", FrameAutoencoder(latent_channels=4, width=4))
    base = PRESETS["tiny"][1]
    cfg = dataclasses.replace(base, data_dir=tmp_path / "train", val_dir=None, out_dir=tmp_path / "run",
                              autoencoder=tmp_path / "ae", compression="strong", compression_prob=1.0,
                              stage_steps=(1, 1), model=dataclasses.replace(base.model, latent_channels=4,
                                                                            latent_width=4, patch_size=2))
    model = load_model(train(cfg))  # (masks scored per 8x8 pixels: the wrong size would not fit its 8x8 grid)
    eng = RolloutEngine(model, 1, compression="strong")
    f, *_ = eng.step(torch.tensor([0]))
    assert f.shape == (1, 64, 64, 3) and eng.state.comp is not None


def test_bad_settings_fail_clearly(model):
    with pytest.raises(ValueError, match="unknown compression setting 'tiny'"):
        get_compression("tiny")
    with pytest.raises(ValueError, match="ssm_thresholds"):
        CompressionConfig(ssm_fractions=(0.5, 1.0), ssm_thresholds=())
    with pytest.raises(ValueError, match="end at 1.0"):
        CompressionConfig(ssm_fractions=(0.5, 0.75), ssm_thresholds=(3.0,))
    with pytest.raises(ValueError, match="cache_dtype"):
        CompressionConfig(cache_dtype="int8")
    attn_only = WorldModel(dataclasses.replace(PRESETS["tiny"][1].model, variant="attn_local"))
    with pytest.raises(ValueError, match="has none"):
        RolloutEngine(attn_only, 1, compression="strong")
    RolloutEngine(attn_only, 1, compression="bf16")  # the cache dtype applies to any variant
    with pytest.raises(ValueError, match="compression"):
        dataclasses.replace(PRESETS["tiny"][1], compression="nope").validate()


def test_recall_cli_compares_settings(model, tmp_path):
    from ssm_gym.eval.recall import Args, run
    from ssm_gym.model.checkpoint import save_model

    ckpt = save_model(tmp_path / "tiny", model)
    res = run(Args(checkpoints=(ckpt,), names=("ours",), num_mazes=2, context=40, n_revisits=1, retrace_len=4,
                   tasks=("retrieval",), sampling_steps=1, compression=("off", "strong-bf16"), out_dir=tmp_path / "out"))
    off, on = res["models"]["ours+off"]["retrieval"], res["models"]["ours+strong-bf16"]["retrieval"]
    assert off["frames"] == on["frames"] == 2 * 4
    assert on["state_bytes_per_env"] < off["state_bytes_per_env"]
    # bf16 halves the cache; the token pool holds at most the ring's tokens + a quarter frame of slack
    # (an untrained model on a first-person maze keeps nearly every token)
    assert on["state_bytes_by_part"]["attention_cache"] < off["state_bytes_by_part"]["attention_cache"] * 0.55
    assert "| ours+strong-bf16 | full |" in (tmp_path / "out" / "recall.md").read_text()
    with pytest.raises(ValueError, match="unknown compression setting"):
        run(Args(checkpoints=(ckpt,), compression=("zip",), out_dir=tmp_path / "x"))


def test_env_takes_compression(model):
    from ssm_gym.envs.world_model_env import WorldModelVectorEnv

    venv = WorldModelVectorEnv(3, model=model, compression="strong")
    obs, _ = venv.reset(seed=0)
    for _ in range(3):
        obs, *_ = venv.step(np.array([0, 1, 2]))
    assert obs.shape == (3, 64, 64, 3) and venv.engine.packed
    env = gym.make("SSMWorld-Maze-v0", model=model, compression="light")
    env.reset(seed=1)
    assert env.step(0)[0].shape == (64, 64, 3)


def test_chunked_engine_matches_whole_batch(model, episode):
    """Stepping a packed batch chunk by chunk (small dense working set) gives the same rollouts,
    resets and state as one chunk; it holds no more bytes (a token pool is as large as its own
    chunk's largest env needs)."""
    frames, actions = episode

    def run(chunk):
        eng = RolloutEngine(model, 5, compression="strong", chunk_envs=chunk)
        eng.reset(torch.ones(5, dtype=torch.bool), frames[None, :8].expand(5, -1, -1, -1, -1),
                  actions[None, :7].expand(5, -1))
        out = []
        for t in range(6):
            out.append(eng.step(actions[7 + t].expand(5))[0].clone())
            if t == 2:  # reset envs 1 and 4 mid-way (only their chunks are unpacked)
                eng.reset(torch.tensor([False, True, False, False, True]), frames[:2])
        return torch.stack(out), eng

    whole, eng_whole = run(None)
    for chunk in (1, 2):
        parts, eng = run(chunk)
        # different batch sizes may round the last bit of a matmul differently: allow 1 level
        assert (whole.int() - parts.int()).abs().max() <= 1
        assert eng.state_nbytes() <= eng_whole.state_nbytes()
        assert torch.equal(eng.state.t, eng_whole.state.t)
        for a, b in zip(eng.state.kv, eng_whole.state.kv):  # the same tokens stored
            assert torch.equal(a.pos, b.pos) and torch.equal(a.keep, b.keep)
    with pytest.raises(ValueError, match="chunk_envs"):
        RolloutEngine(model, 2, chunk_envs=0)


def _stored(cache):
    """(pos, keep, kept keys, kept values) of a ring: what the model can read of it."""
    m = cache.keep & (cache.pos >= 0)[..., None]
    return cache.pos.masked_fill(~m.any(-1), -1), m, cache.k[m], cache.v[m]


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 5), cut=st.integers(0, 5),
       setting=st.sampled_from(["light", "strong", "strong-bf16", "strong-compact", "strong-bf16-compact"]),
       seed=st.integers(0, 2**16))
def test_packed_chunks_round_trip(model, n, cut, setting, seed):
    """Packing is lossless, and packing two env ranges apart and joining them (the engine's
    chunks, each pool with its own capacity) gives back the whole batch."""
    cut = min(cut, n)
    g = torch.Generator().manual_seed(seed)
    state = model.init_state(n, compression=setting)
    frames = torch.randint(0, 256, (n, 12, 64, 64, 3), generator=g, dtype=torch.uint8)
    frames[:, 6:] = frames[:, 5:6]  # a static stretch: blocks shrink, tokens are dropped
    frames[:cut, 3:] = frames[:cut, 2:3]  # the first envs keep fewer tokens: pools of different sizes
    model.observe_clip(state, frames, torch.randint(0, 6, (n, 12), generator=g))
    packed = pack_state(state, model.layers)
    parts = [pack_state(state.index_select(torch.arange(a, b)), model.layers) for a, b in ((0, cut), (cut, n)) if b > a]
    for again in (unpack_state(packed), unpack_state(type(packed).cat(parts))):
        for a, b in zip(state.ssm, again.ssm):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for a, b in zip(state.kv, again.kv):
            for x, y in zip(_stored(a), _stored(b)):
                assert torch.equal(x, y)
    assert sum(p.nbytes() for p in parts) <= packed.nbytes() + 64  # (+ a step counter's worth of rounding)


def test_compact_storage_holds_fewer_bytes_than_pools(model, episode):
    """The two storages of one rule: the same frames (to one level: the attention sums its keys in
    another order), the compact one holds only the stored tokens, fewer bytes than the pools."""
    frames, actions = episode
    pool, eng_pool = rollout(model, "strong", frames, actions, 6, num_envs=3)
    compact, eng_compact = rollout(model, "strong-compact", frames, actions, 6, num_envs=3)
    assert (pool.int() - compact.int()).abs().max() <= 1
    a, b = eng_pool.model_state_nbytes_by_part(), eng_compact.model_state_nbytes_by_part()
    assert b["attention_cache"] < a["attention_cache"] and b["ssm_state"] == a["ssm_state"]
    with pytest.raises(ValueError, match="storage"):
        CompressionConfig("x", kv_threshold=1.0, storage="zip")
