"""Episode files: round trip, replay against the simulator, bad files rejected by name."""

import dataclasses
import json
import zipfile

import gymnasium as gym
import numpy as np
import pytest

import ssm_gym  # noqa: F401
from ssm_gym.maze.dataset import (
    START_ACTION,
    ClipDataset,
    DatasetError,
    check_episode_file,
    episode_actions,
    episode_effective_actions,
    episode_prev_actions,
    list_episodes,
    load_episode,
    save_episode,
)
from ssm_gym.maze.record import record_episodes
from ssm_gym.maze.sim import FORWARD_ACTIONS, TURN_ONLY
from training.collect import Args, collect


@pytest.fixture(scope="module")
def episodes():
    return record_episodes([11, 12, 13], ["explore", "oracle", "random"], steps=40)


def test_round_trip_and_layout(tmp_path, episodes):
    path = tmp_path / "ep.npz"
    save_episode(path, episodes[0])
    assert check_episode_file(path) == 40
    ep = load_episode(path)
    assert set(ep) == set(episodes[0])
    for k, v in episodes[0].items():
        assert np.array_equal(ep[k], v) and ep[k].dtype == v.dtype, k
    assert ep["image"].shape == (41, 64, 64, 3) and ep["action"].shape == (41, 6)
    assert ep["action"][0].sum() == 0 and ep["reset"][0] and not ep["reset"][1:].any()
    assert not list(tmp_path.glob("*.tmp")), "no temporary file left behind"


def test_episode_replays_in_the_env(episodes):
    ep = episodes[1]
    env = gym.make("SSMWorld-MazeReal-v0")
    obs, info = env.reset(seed=int(ep["seed"]))
    assert np.array_equal(obs, ep["image"][0]) and np.array_equal(info["maze_layout"], ep["maze_layout"])
    for t, a in enumerate(episode_actions(ep)):
        obs, r, *_ = env.step(a)
        assert np.array_equal(obs, ep["image"][t + 1]) and r == ep["reward"][t + 1]


def test_truncated_file_rejected_by_name(tmp_path, episodes):
    path = tmp_path / "ep_000007.npz"
    save_episode(path, episodes[0])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="ep_000007.npz.*truncated or corrupt"):
        check_episode_file(path)
    with pytest.raises(DatasetError, match="ep_000007.npz"):
        load_episode(path)
    with pytest.raises(DatasetError, match="ep_000007.npz"):
        list_episodes(tmp_path)


def test_corrupted_bytes_rejected_by_name(tmp_path, episodes):
    path = tmp_path / "ep.npz"
    save_episode(path, episodes[0])
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("image.npy")
    mid = info.header_offset + 100 + info.compress_size // 2
    data[mid : mid + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="ep.npz"):
        load_episode(path)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda e: e.pop("action"), "missing arrays"),
        (lambda e: e.update(image=e["image"][:, :32]), "image"),
        (lambda e: e.update(image=e["image"].astype(np.float32)), "uint8"),
        (lambda e: e.update(reward=e["reward"][:-3]), "'reward' has 38 rows"),
        (lambda e: e.update(action=e["action"] * 2), "one-hot"),
    ],
)
def test_malformed_episode_rejected(tmp_path, episodes, change, match):
    ep = {k: v.copy() for k, v in episodes[0].items()}
    change(ep)
    path = tmp_path / "bad.npz"
    save_episode(path, ep)
    with pytest.raises(DatasetError, match=match):
        load_episode(path)


def test_missing_dir_and_empty_dir(tmp_path):
    with pytest.raises(DatasetError, match="not a directory"):
        list_episodes(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no episode files"):
        list_episodes(tmp_path)


def test_collect_cli_writes_resumes_and_loader_yields_clips(tmp_path):
    args = Args(out_dir=tmp_path, num_episodes=5, episode_len=30, batch=2, workers=1)
    collect(args)
    files = sorted(tmp_path.glob("ep_*.npz"))
    assert len(files) == 5 and json.loads((tmp_path / "dataset.json").read_text())["num_episodes"] == 5
    # A deleted and a truncated episode are redone; good ones are kept as they are.
    mtime = files[0].stat().st_mtime_ns
    files[1].unlink()
    files[2].write_bytes(files[2].read_bytes()[:100])
    collect(args)
    assert files[0].stat().st_mtime_ns == mtime
    assert check_episode_file(files[1]) == 30 and check_episode_file(files[2]) == 30
    policies = {str(load_episode(f)["policy"]) for f in files}
    assert policies <= {"explore", "oracle", "random"}
    # Other settings: the old episodes do not count as done.
    collect(Args(out_dir=tmp_path, num_episodes=5, episode_len=30, batch=5, seed=500))
    assert {int(load_episode(f)["seed"]) for f in files} == set(range(500, 505))
    collect(args)  # back to the first settings

    ds = ClipDataset(tmp_path, clip_len=8, seed=0)
    it = iter(ds)
    clips = [next(it) for _ in range(20)]
    for c in clips:
        assert c["frames"].shape == (8, 64, 64, 3) and c["prev_actions"].shape == (8,)
        assert c["frames"].dtype.is_floating_point is False
        assert ((c["prev_actions"] >= 0) & (c["prev_actions"] <= START_ACTION)).all()
    again = [next(iter(ClipDataset(tmp_path, clip_len=8, seed=0))) for _ in range(1)]
    assert np.array_equal(again[0]["frames"], clips[0]["frames"])
    with pytest.raises(ValueError, match="clip_len"):
        ClipDataset(tmp_path, clip_len=100)


def test_several_folders_are_one_dataset(tmp_path, episodes):
    """Episodes of several folders (e.g. data/maze and data/maze-stumble) are listed in the order
    given and sampled as one set: clips come from every folder; no folder is a clear error."""
    for name, ep in (("a", episodes[0]), ("b", episodes[1])):
        save_episode(tmp_path / name / "ep_000000.npz", ep)
    listed = list_episodes([tmp_path / "a", tmp_path / "b"])
    assert [p.parent.name for p, _ in listed] == ["a", "b"] and [t for _, t in listed] == [40, 40]
    ds = ClipDataset((tmp_path / "a", tmp_path / "b"), clip_len=8, seed=0)
    rng = np.random.default_rng(0)
    assert {int(ds.draw(rng)[0]) for _ in range(50)} == {0, 1}
    with pytest.raises(DatasetError, match="no episode folder"):
        list_episodes([])
    with pytest.raises(DatasetError, match="not a directory"):
        list_episodes([tmp_path / "a", tmp_path / "nope"])


def test_collect_stumble_policy(tmp_path):
    """`--policy-mix.stumble 1` records wall-bumping episodes; the default mix never draws it."""
    collect(Args(out_dir=tmp_path, num_episodes=2, episode_len=20, batch=2,
                 policy_mix={"explore": 0.0, "oracle": 0.0, "random": 0.0, "stumble": 1.0}))
    assert {str(load_episode(f)["policy"]) for f in tmp_path.glob("*.npz")} == {"stumble"}
    assert Args().policy_mix["stumble"] == 0.0


def test_collect_rejects_bad_policy_mix(tmp_path):
    with pytest.raises(ValueError, match="policy_mix"):
        collect(Args(out_dir=tmp_path, policy_mix={"explore": -1.0}))


def test_reward_clips_are_oversampled(tmp_path):
    """reward_clip_prob=1: every clip holds a reward event after its first frame; 0: the same
    clips as before the option existed (uniform positions, same random stream)."""
    eps = record_episodes([31, 32], ["oracle", "oracle"], steps=60)
    assert sum(int((e["reward"] > 0).sum()) for e in eps) >= 1
    for i, ep in enumerate(eps):
        save_episode(tmp_path / f"ep_{i:06d}.npz", ep)
    ds = ClipDataset(tmp_path, clip_len=10, reward_clip_prob=1.0)
    rng = np.random.default_rng(0)
    for _ in range(30):
        assert ds.sample(rng)["rewards"][1:].sum() > 0
    uniform, plain = ClipDataset(tmp_path, clip_len=10), ClipDataset(tmp_path, clip_len=10, reward_clip_prob=0.0)
    r1, r2 = np.random.default_rng(1), np.random.default_rng(1)
    starts = [uniform.draw(r1) for _ in range(50)]
    assert starts == [plain.draw(r2) for _ in range(50)] and len(set(starts)) > 10
    half = ClipDataset(tmp_path, clip_len=10, reward_clip_prob=0.5)
    share = np.mean([half.sample(rng)["rewards"][1:].sum() > 0 for _ in range(400)])
    base = np.mean([uniform.sample(rng)["rewards"][1:].sum() > 0 for _ in range(400)])
    assert share > base + 0.2
    with pytest.raises(ValueError, match="reward_clip_prob"):
        ClipDataset(tmp_path, clip_len=10, reward_clip_prob=1.5)
    quiet = tmp_path / "quiet"
    quiet.mkdir()
    save_episode(quiet / "ep_000000.npz", {**eps[0], "reward": np.zeros_like(eps[0]["reward"])})
    with pytest.raises(DatasetError, match="no episode has a reward"):
        ClipDataset(quiet, clip_len=10, reward_clip_prob=0.5)


def test_preload_reads_what_single_reads_give_within_the_cache_and_names_a_bad_file(tmp_path, episodes):
    for i, ep in enumerate(episodes):
        save_episode(tmp_path / f"ep_{i:06d}.npz", ep)
    pre = ClipDataset(tmp_path, 8)
    pre.preload()
    lazy = ClipDataset(tmp_path, 8)
    for i in range(3):
        for k, v in lazy._episode(i).items():
            assert np.array_equal(pre._cache[i][k], v), k
    small = ClipDataset(tmp_path, 8, cache_size=2)
    small.preload()
    assert sorted(small._cache) == [0, 1]  # never past cache_size
    # a file that goes bad after listing (list_episodes checks each once): its name, not a hang
    bad = ClipDataset(tmp_path, 8)
    data = (tmp_path / "ep_000001.npz").read_bytes()
    (tmp_path / "ep_000001.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="ep_000001.npz"):
        bad.preload()


def test_record_episodes_with_a_frame_agent():
    """A learned agent acts on the frames it is shown, all its envs in one call per step; with
    epsilon 0 the recorded actions are exactly its own, with epsilon 1 none are (random); the
    scripted envs beside it record the same episode as without it."""
    calls = []

    def forward_agent(obs, starts):
        calls.append((obs.copy(), starts.copy()))
        return np.ones(len(obs), dtype=np.int64)  # 1 = forward

    eps = record_episodes([5, 6, 7], ["agent", "explore", "agent:x"], steps=12, agent=forward_agent)
    assert len(calls) == 12 and all(o.shape == (2, 64, 64, 3) for o, _ in calls)
    assert calls[0][1].all() and not any(s.any() for _, s in calls[1:])  # episode start on the first step only
    assert np.array_equal(calls[3][0][1], eps[2]["image"][3])  # the frame before the action
    for e in (eps[0], eps[2]):
        assert (e["action"][1:].argmax(1) == 1).all()
    assert np.array_equal(eps[1]["image"], record_episodes([6], ["explore"], steps=12)[0]["image"])
    noisy = record_episodes([5], ["agent"], steps=50, agent=forward_agent, agent_epsilon=1.0)[0]
    assert (noisy["action"][1:].argmax(1) != 1).sum() > 20
    # Bursts: the explorer drives, the agent takes over for 4 steps after 4-12 explore steps, told
    # an episode starts at each takeover.
    calls.clear()
    burst = record_episodes([5], ["agent"], steps=200, agent=forward_agent, agent_burst=4)[0]
    starts = np.flatnonzero([s[0] for _, s in calls]) + 1  # steps at which a turn begins
    gaps = np.diff(starts)
    assert len(starts) > 10 and gaps.min() >= 8 and gaps.max() <= 16
    for t0 in starts[starts <= 196]:
        assert (burst["action"][t0:t0 + 4].argmax(1) == 1).all()
    assert (burst["action"][1:].argmax(1) != 1).sum() > 50  # the explorer's turns
    with pytest.raises(ValueError, match="no agent"):
        record_episodes([5], ["agent"], steps=3)
    with pytest.raises(ValueError, match="must return 1 actions"):
        record_episodes([5], ["agent"], steps=3, agent=lambda o, s: np.array([9]))


def test_collect_with_a_saved_agent(tmp_path):
    """`--agent A --policy-mix.agent 1`: episodes driven by a saved SB3 agent, named in the file by
    the agent's content, so another agent's episodes are not taken as done; bad settings fail."""
    from stable_baselines3 import PPO

    from ssm_gym.envs.sb3 import SB3VecEnv

    def save_agent(path, seed):
        venv = SB3VecEnv(gym.make_vec("SSMWorld-MazeReal-v0", num_envs=2, max_episode_steps=8,
                                          autoreset_mode="SameStep"))
        PPO("CnnPolicy", venv, n_steps=8, batch_size=16, n_epochs=1, seed=seed, device="cpu").save(path)
        return path

    a, b = save_agent(tmp_path / "a.zip", 0), save_agent(tmp_path / "b.zip", 1)
    mix = {"explore": 0.0, "oracle": 0.0, "random": 0.0, "stumble": 0.0, "agent": 1.0}
    args = Args(out_dir=tmp_path / "data", num_episodes=2, episode_len=10, batch=2, policy_mix=mix, agent=a)
    collect(args)
    files = sorted((tmp_path / "data").glob("*.npz"))
    labels = {str(load_episode(f)["policy"]) for f in files}
    assert len(labels) == 1 and labels.pop().startswith("agent:") and check_episode_file(files[0]) == 10
    mtime = files[0].stat().st_mtime_ns
    collect(args)
    assert files[0].stat().st_mtime_ns == mtime  # same agent: done
    collect(dataclasses.replace(args, agent=b))
    assert files[0].stat().st_mtime_ns != mtime  # another agent: redone
    with pytest.raises(ValueError, match="needs the agent"):
        collect(dataclasses.replace(args, agent=None))
    with pytest.raises(ValueError, match="share of the episodes is 0"):
        collect(dataclasses.replace(args, policy_mix={"explore": 1.0}))
    with pytest.raises(FileNotFoundError, match="no saved agent"):
        collect(dataclasses.replace(args, agent=tmp_path / "nope.zip"))


def test_effective_actions_take_out_cancelled_moves(tmp_path):
    """A move a wall cancelled (position unchanged after a forward action) becomes its turn or the
    no-op; everything else stays; the simulator agrees on recorded episodes."""
    ep = {"action": np.eye(6, dtype=np.float32)[[0, 1, 4, 5, 2, 0, 1]], "agent_pos": np.array(
        [[1, 1], [1, 1], [1, 1], [2, 1], [2, 1], [2, 1], [3, 1]], np.float32)}
    ep["action"][0] = 0
    assert episode_effective_actions(ep).tolist() == [START_ACTION, 0, 2, 5, 2, 0, 1]
    with pytest.raises(DatasetError, match="ep_9.npz.*agent_pos"):
        episode_effective_actions({"action": ep["action"]}, "ep_9.npz")

    eps = record_episodes([3, 4], ["stumble", "random"], steps=60)
    for i, e in enumerate(eps):
        save_episode(tmp_path / f"ep_{i:06d}.npz", e)
    blocked = 0
    for e in eps:
        prev, eff = episode_prev_actions(e), episode_effective_actions(e)
        poses = e["agent_pose"]
        for t in range(1, len(prev)):
            moved = not np.array_equal(poses[t, :2], poses[t - 1, :2])
            assert eff[t] == (prev[t] if moved or prev[t] not in FORWARD_ACTIONS else TURN_ONLY[prev[t]])
            blocked += int(eff[t] != prev[t])
    assert blocked > 0
    item = next(iter(ClipDataset(tmp_path, clip_len=8, seed=0, effective_actions=True)))
    assert item["effective_actions"].shape == item["prev_actions"].shape == (8,)
    assert "effective_actions" not in next(iter(ClipDataset(tmp_path, clip_len=8, seed=0)))


def test_blocked_clips_are_oversampled(tmp_path):
    """blocked_clip_prob=1: every clip holds a move a wall cancelled after its first frame; with
    rewards oversampled too the two shares split the clips; their sum over 1, or no such move in
    the data, is a clear error."""
    eps = record_episodes([5, 6], ["stumble", "oracle"], steps=80)
    for i, e in enumerate(eps):
        save_episode(tmp_path / f"ep_{i:06d}.npz", e)
    blocked = lambda c: bool((c["effective_actions"][1:] != c["prev_actions"][1:]).any())  # noqa: E731
    ds = ClipDataset(tmp_path, clip_len=10, blocked_clip_prob=1.0, effective_actions=True)
    rng = np.random.default_rng(0)
    for _ in range(30):
        assert blocked(ds.sample(rng))
    uniform = ClipDataset(tmp_path, clip_len=10, effective_actions=True)
    base = np.mean([blocked(uniform.sample(rng)) for _ in range(300)])
    assert base < 0.9
    both = ClipDataset(tmp_path, clip_len=10, reward_clip_prob=0.5, blocked_clip_prob=0.5, effective_actions=True)
    clips = [both.sample(rng) for _ in range(300)]
    assert np.mean([blocked(c) for c in clips]) > 0.45 and np.mean([c["rewards"][1:].sum() > 0 for c in clips]) > 0.45
    with pytest.raises(ValueError, match="at most 1"):
        ClipDataset(tmp_path, clip_len=10, reward_clip_prob=0.6, blocked_clip_prob=0.6)
    with pytest.raises(ValueError, match="blocked_clip_prob"):
        ClipDataset(tmp_path, clip_len=10, blocked_clip_prob=-0.1)
    free = tmp_path / "free"
    free.mkdir()
    e = eps[0]
    save_episode(free / "ep_000000.npz", {**e, "agent_pos": np.arange(len(e["agent_pos"]))[:, None].repeat(2, 1)
                                          .astype(e["agent_pos"].dtype)})
    with pytest.raises(DatasetError, match="no episode has a move a wall cancelled"):
        ClipDataset(free, clip_len=10, blocked_clip_prob=0.5)
