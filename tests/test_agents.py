"""Agents: PPO in imagination end to end, the CEM planner on a toy problem, evaluation."""

import csv
import dataclasses
import json

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents.evaluate import load_agent, model_view_returns, real_returns, sb3_act_fn, scripted_returns, summary
from agents.plan import cem_plan
from agents.ppo import Args as PPOArgs
from agents.ppo import train as train_ppo
from agents.ppo import make_env
from ssm_gym.model.checkpoint import save_model
from ssm_gym.model.world_model import WorldModel
from ssm_gym.train.config import PRESETS


class ToyEngine:
    """Known answer: reward 1 on the step the counter reaches 3; action 1 adds one, others nothing."""

    def __init__(self, counters):
        self.counters = np.array(counters)
        self.num_envs = len(self.counters)

    def fork(self, idx):
        return ToyEngine(self.counters[np.asarray(idx)])

    def step(self, actions):
        before = self.counters
        self.counters = self.counters + (np.asarray(actions) == 1)
        rewards = ((self.counters == 3) & (before != 3)).astype(np.float32)
        return None, torch.from_numpy(rewards), torch.zeros(self.num_envs, dtype=torch.bool)


def toy_return(choose, episodes=20, steps=4):
    total = 0.0
    for ep in range(episodes):
        env = ToyEngine([0])
        for _ in range(steps):
            a = choose(env, ep)
            total += float(env.step([a])[1][0])
    return total / episodes


def test_planner_beats_random_on_a_known_toy_problem():
    rng = np.random.default_rng(0)
    planned = toy_return(lambda env, ep: cem_plan(env, 0, horizon=4, population=256, elites=8, iterations=4, rng=rng)[0])
    rand = toy_return(lambda env, ep: int(rng.integers(6)))
    assert planned == 1.0, "the planner reaches the counter value 3 within 4 steps every time"
    assert rand < 0.2
    a, ret = cem_plan(ToyEngine([2]), 0, horizon=3, population=32, elites=4, iterations=2, rng=rng)
    assert a == 1 and ret == 1.0  # reward on the first imagined step: undiscounted


class NoisyHeadEngine(ToyEngine):
    """The toy with a reward head's noise: action 0 reads 0.3 on every step (never a touch), the
    touch at counter 3 reads 0.9 and ends the imagined episode. Summed raw, noise first and the
    touch last scores most (brute force below); paid 1/0 at 0.5, only the touch counts."""

    def fork(self, idx):
        return NoisyHeadEngine(self.counters[np.asarray(idx)])

    def step(self, actions):
        _, touch, _ = super().step(actions)
        raw = torch.where(torch.as_tensor(np.asarray(actions)) == 0, 0.3, 0.9 * touch)
        return None, raw, touch > 0


def test_planner_pays_as_the_env_does_and_ignores_head_noise():
    import itertools

    from agents.plan import pay

    def raw_return(seq, start=1):  # cem_plan's score of one sequence, by hand
        counter, total = start, 0.0
        for h, a in enumerate(seq):
            counter += a == 1
            touch = counter == 3
            total += 0.95**h * (0.3 if a == 0 else 0.9 * touch)
            if touch:
                break
        return total

    best = max(itertools.product(range(6), repeat=4), key=raw_return)
    assert best[0] == 0 and raw_return(best) > raw_return((1, 1, 0, 0)), "the raw optimum puts the noise first"
    rng = np.random.default_rng(1)
    kw = dict(horizon=4, population=512, elites=8, iterations=3, rng=rng)
    a_raw, ret_raw = cem_plan(NoisyHeadEngine([1]), 0, **kw)
    a_paid, ret_paid = cem_plan(NoisyHeadEngine([1]), 0, score=lambda raw: pay(raw, "threshold", 0.5), **kw)
    assert a_raw == 0 and ret_raw == pytest.approx(raw_return(best)), "raw scores: the noise of action 0 comes first"
    assert a_paid == 1 and ret_paid == pytest.approx(0.95), "paid 1/0 at 0.5: the touch two steps ahead wins"
    a_none, ret_none = cem_plan(NoisyHeadEngine([-10]), 0, score=lambda raw: pay(raw, "threshold", 0.5), **kw)
    assert ret_none == 0.0, "no touch within reach: nothing is paid"


def test_scripted_references_and_summary():
    seeds = [3_000_000, 3_000_001, 3_000_002]
    oracle = scripted_returns("oracle", seeds, 150)
    rand = scripted_returns("random", seeds, 150)
    assert oracle.mean() > rand.mean() and oracle.shape == (3,)
    s = summary([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and abs(s["stderr"] - 1 / np.sqrt(3)) < 1e-9


def test_behaviour_counts_forward_moves_into_walls():
    """An agent that only walks forward ends pressed to a wall (most of its moves cancelled); the
    oracle never walks into one; action shares add up to 1."""
    from agents.evaluate import behaviour

    seeds = [3_000_000, 3_000_001]
    forward, oracle = {}, {}
    real_returns(lambda obs, starts: np.ones(len(obs), dtype=np.int64), seeds, 60, forward)
    scripted_returns("oracle", seeds, 60, oracle)
    fwd, orc = behaviour(forward), behaviour(oracle)
    assert fwd["action_share"]["forward"] == 1.0 and fwd["forward_blocked_share"] > 0.5
    assert orc["forward_blocked_share"] == 0.0 and abs(sum(orc["action_share"].values()) - 1) < 1e-6


def test_ppo_in_imagination_end_to_end_and_evaluate(tmp_path):
    torch.manual_seed(0)
    ckpt = save_model(tmp_path / "tiny", WorldModel(PRESETS["tiny"][1].model))
    args = PPOArgs(checkpoint=ckpt, total_steps=256, num_envs=4, max_episode_steps=32, n_steps=32, batch_size=64,
                   n_epochs=1, eval_every=128, eval_episodes=2, eval_max_steps=20, out_dir=tmp_path / "ppo")
    path = train_ppo(args)
    assert path.is_file() and (tmp_path / "ppo" / "curve.png").is_file()
    rows = (tmp_path / "ppo" / "curve.csv").read_text().splitlines()
    assert rows[0].startswith("env_steps,real_return") and len(rows) >= 3
    stepped = [r for r in csv.DictReader(rows) if r["paid_per_step"] != "nan"]  # rows with steps since the last
    assert len(stepped) >= 2
    for row in stepped:  # fresh mazes from seeds: the real maze follows every env
        assert 0 <= float(row["real_per_step"]) <= 1
    agent = load_agent(path)
    again = load_agent(tmp_path / "ppo")  # the run folder names its agent.zip
    assert all(torch.equal(x, y) for x, y in zip(agent.policy.state_dict().values(), again.policy.state_dict().values()))
    returns = real_returns(sb3_act_fn(agent), [3_000_000, 3_000_001], 20)
    assert returns.shape == (2,) and np.isfinite(returns).all()
    # the CLI's JSON records how it evaluated, and agents.compare reads it
    from agents import compare, evaluate
    res = evaluate.main(evaluate.Args(agent=path, episodes=2, max_steps=20, out=tmp_path / "ppo" / "eval.json"))
    assert res["setting"] == {"episodes": 2, "max_steps": 20, "first_seed": 3_000_000, "deterministic": False,
                              "view": "real", "checkpoint": None, "precision": "bf16"}
    # same seeds, and the same sampled actions: SB3's load reseeds torch, both times after a load
    assert res["agent"]["mean"] == pytest.approx(returns.mean())
    assert compare.main(compare.Args(groups=[f"tiny={tmp_path}/ppo"]))["groups"]["tiny"]["returns"] == [res["agent"]["mean"]]
    # --view model: the same real maze, the agent seeing the model's prediction of each real frame
    seen, real_seen, moves = [], [], {}
    act = sb3_act_fn(agent)
    model_view_returns(lambda obs, starts: (seen.append(obs.copy()), act(obs, starts))[1], [3_000_000, 3_000_001], 4,
                       ckpt, precision="fp32", record=moves)
    assert np.stack(moves["actions"]).shape == (4, 2)  # the agent's moves in the real maze are recorded too
    real_returns(lambda obs, starts: (real_seen.append(obs.copy()), np.ones(2, dtype=np.int64))[1],
                 [3_000_000, 3_000_001], 1)
    assert len(seen) == 4 and np.array_equal(seen[0], real_seen[0]), "the first frame is the real one"
    assert all(s.shape == (2, 64, 64, 3) and s.dtype == np.uint8 for s in seen)
    with pytest.raises(FileNotFoundError, match="no saved agent"):
        load_agent(tmp_path / "missing.zip")
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        train_ppo(dataclasses.replace(args, cuda_graph=True))


def test_ppo_time_budget_stops_training_early_with_starts_from_real_data(tmp_path):
    from ssm_gym.maze.dataset import save_episode
    from ssm_gym.maze.record import record_episodes

    for i, ep in enumerate(record_episodes([41, 42], ["explore", "random"], steps=20)):
        save_episode(tmp_path / "data" / f"ep_{i:06d}.npz", ep)
    torch.manual_seed(0)
    ckpt = save_model(tmp_path / "tiny", WorldModel(PRESETS["tiny"][1].model))
    args = PPOArgs(checkpoint=ckpt, total_steps=10**7, num_envs=4, max_episode_steps=8, n_steps=32, batch_size=64,
                   n_epochs=1, eval_every=10**8, eval_episodes=1, eval_max_steps=5, time_budget_s=2.0,
                   context_data=tmp_path / "data", context_len=4, out_dir=tmp_path / "ppo",
                   reward_mode="expected", reward_baseline="model", baseline_episodes=2)
    path = train_ppo(args)
    steps = [int(r.split(",")[0]) for r in (tmp_path / "ppo" / "curve.csv").read_text().splitlines()[1:]]
    assert path.is_file() and 0 < steps[-1] < 10**5
    # the per-action reward baseline was measured on the real states and used
    base = json.loads((tmp_path / "ppo" / "reward_baseline.json").read_text())
    assert len(base["expected_reward_by_action"]) == 6 and base["samples"] == 2 * 8
    with pytest.raises(ValueError, match="needs --reward-mode expected and --context-data"):
        train_ppo(dataclasses.replace(args, context_data=None))
    # the control: the real maze started at the same recorded moments
    real = dataclasses.replace(args, env="real", reward_mode="threshold", reward_baseline="none",
                               out_dir=tmp_path / "ppo-real")
    venv = make_env(real).venv
    assert venv.unwrapped.moments is not None and venv.unwrapped.moments.context_len == 4
    assert train_ppo(real).is_file()
    with pytest.raises(ValueError, match="--env real pays the real maze's"):
        make_env(dataclasses.replace(real, reward_mode="expected"))
    with pytest.raises(ValueError, match="--env real pays the real maze's"):
        make_env(dataclasses.replace(real, reward_threshold=0.2))
    with pytest.raises(ValueError, match="--reward-threshold applies to --reward-mode threshold, not 'expected'"):
        make_env(dataclasses.replace(args, reward_threshold=0.2))
    low = make_env(dataclasses.replace(args, reward_mode="threshold", reward_baseline="none", reward_threshold=0.2))
    assert low.venv.unwrapped.reward_threshold == 0.2
    # in imagination from recorded starts the real maze follows every env: the true reward is logged
    stepped = [r for r in csv.DictReader((tmp_path / "ppo" / "curve.csv").read_text().splitlines())
               if r["paid_per_step"] != "nan"]
    assert stepped and all(0 <= float(r["real_per_step"]) <= 1 for r in stepped)


def test_transfer_scores_agents_on_real_and_imagined_frames(tiny_checkpoint, dataset, tmp_path):
    """Every policy is scored on both kinds of frames from the same recorded starts, and the reward
    is the real maze's in both: the random policy takes the same actions from the same moments in
    both, so it earns exactly the same there (the oracle-driven dataset makes touches likely)."""
    from stable_baselines3 import PPO

    from agents.transfer import Args, main
    from ssm_gym.envs.sb3 import SB3VecEnv

    venv = SB3VecEnv(gym.make_vec("SSMWorld-MazeReal-v0", num_envs=2, max_episode_steps=8, autoreset_mode="SameStep"))
    agent = PPO("CnnPolicy", venv, n_steps=16, batch_size=32, n_epochs=1, seed=0, device="cpu")
    agent.save(tmp_path / "agent.zip")
    out = main(Args(agents=(tmp_path / "agent.zip",), checkpoint=tiny_checkpoint, context_data=dataset, context_len=4,
                    horizon=5, num_envs=2, batches=2, json=tmp_path / "t.json"))
    assert set(out["policies"]) == {str(tmp_path / "agent.zip"), "random"} and out["episodes"] == 4
    for r in out["policies"].values():
        for frames in ("real frames", "imagined frames"):
            assert 0 <= r[frames]["mean"] <= 5 and sum(r[frames]["action_share"].values()) == pytest.approx(1, abs=0.01)
    assert out["policies"]["random"]["real frames"] == out["policies"]["random"]["imagined frames"]
    for r in out["policies"].values():  # the head's report counts the touches the imagined episodes made
        h = r["head"]
        assert len(h["by_step"]) == 5 and sum(t for t, _ in h["by_step"]) == h["touches"]
        assert h["touches"] == round(r["imagined frames"]["mean"] * out["episodes"])
        assert all(0 <= p <= t for t, p in h["by_step"]) and h["unmatched_payouts_per_1k_steps"] >= 0
    assert json.loads((tmp_path / "t.json").read_text())["policies"] == out["policies"]
    with pytest.raises(ValueError, match="horizon"):
        main(Args(checkpoint=tiny_checkpoint, context_data=dataset, horizon=0))


def test_head_recall_counts_touches_paid_on_and_near_their_step():
    from agents.transfer import head_recall

    real = np.zeros((2, 4))
    real[0, 1] = real[0, 3] = real[1, 0] = 1  # three touches
    raw = np.full((2, 4), 0.1)
    raw[0, 1] = 0.9  # paid on its step
    raw[0, 2] = 0.6  # a step early for the touch at step 4: within one
    raw[1, 3] = 0.7  # no touch near: false
    h = head_recall(raw, real, 0.5)
    assert h["touches"] == 3 and h["steps"] == 8
    assert h["paid_on_step"] == pytest.approx(1 / 3) and h["paid_within_one"] == pytest.approx(2 / 3)
    assert h["unmatched_payouts_per_1k_steps"] == pytest.approx(1000 / 8)
    assert h["by_step"] == [[1, 0], [1, 1], [0, 0], [1, 0]]
    assert head_recall(raw, real, 0.95)["paid_within_one"] == 0  # nothing paid above 0.95
    raw[1, 1] = 0.8  # one step after the touch at step 1 of episode 2, in the same episode: within one
    assert head_recall(raw, real, 0.5)["paid_within_one"] == pytest.approx(1.0)
    assert head_recall(raw, np.zeros((2, 4)), 0.5)["paid_on_step"] is None
    # episodes are kept apart: a payout at the last step of one is not near a touch at the first of the next
    real2, raw2 = np.zeros((2, 4)), np.zeros((2, 4))
    real2[1, 0], raw2[0, 3] = 1, 0.9
    assert head_recall(raw2, real2, 0.5)["paid_within_one"] == 0
    # steps after a row's episode ended early are not counted
    valid = np.array([[True] * 4, [True, True, False, False]])
    v = head_recall(raw, real, 0.5, valid)
    assert v["steps"] == 6 and v["touches"] == 3 and v["unmatched_payouts_per_1k_steps"] == 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_plan_cli_acts_in_the_real_maze_and_writes_results(tiny_checkpoint, tmp_path, precision):
    import json

    from agents import plan

    out = tmp_path / "plan.json"
    res = plan.main(plan.Args(checkpoint=tiny_checkpoint, episodes=2, max_steps=3, horizon=2, population=3, elites=1,
                              iterations=1, reward_mode="expected", threads=1, precision=precision, out=out))
    saved = json.loads(out.read_text())
    assert saved["planner"] == res["planner"] and res["planner"]["episodes"] == 2
    assert len(saved["planner_returns"]) == 2 and saved["args"]["horizon"] == 2
    assert saved["args"]["reward_mode"] == "expected" and saved["args"]["precision"] == precision
    with pytest.raises(ValueError, match="--reward-threshold applies to --reward-mode threshold"):
        plan.main(plan.Args(checkpoint=tiny_checkpoint, reward_mode="expected", reward_threshold=0.2))


def _write_eval(path, agent_mean, episodes=64, max_steps=200, setting=True, blocked=None):
    path.mkdir(parents=True)
    d = {"agent": {"mean": agent_mean, "stderr": 0.01, "episodes": episodes}}
    if blocked is not None:
        d["agent"]["behaviour"] = {"forward_blocked_share": blocked}
    if setting:
        d["setting"] = {"episodes": episodes, "max_steps": max_steps, "first_seed": 3_000_000, "view": "real"}
    (path / "eval.json").write_text(json.dumps(d))


def test_compare_groups_means_ratios_and_differences_by_hand(tmp_path, capsys):
    from agents import compare

    for s, (r, b) in enumerate([(0.4, 0.5), (0.6, 0.4), (0.5, None)]):
        _write_eval(tmp_path / f"real-seed{s}", r, blocked=b)
    for s, r in enumerate([0.1, 0.3]):
        _write_eval(tmp_path / f"dream-seed{s}", r, setting=False)  # older results carry no setting
    (tmp_path / "dream-seed10").mkdir()  # natural order: seed 10 after seed 2
    (tmp_path / "dream-seed10" / "eval.json").write_text(json.dumps({"agent": {"mean": 0.4, "episodes": 64}}))
    _write_eval(tmp_path / "dream-seed2", 0.2)
    out = compare.main(compare.Args(groups=[f"dream={tmp_path}/dream-seed*", f"real={tmp_path}/real-seed*"],
                                    reference="real"))
    dream, real = out["groups"]["dream"], out["groups"]["real"]
    assert dream["seeds"] == ["seed 0", "seed 1", "seed 2", "seed 10"]
    assert dream["returns"] == [0.1, 0.3, 0.2, 0.4]
    assert dream["mean"] == pytest.approx(0.25) and real["mean"] == pytest.approx(0.5)
    assert real["stderr"] == pytest.approx(0.1 / np.sqrt(3))          # s.d. 0.1 over 3 seeds
    assert dream["stderr"] == pytest.approx(np.sqrt(0.05 / 3) / 2)     # squares 0.05 over 3 d.o.f., 4 seeds
    assert dream["ratio"] == pytest.approx(0.5) and real["ratio"] == 1.0
    assert dream["ratio_stderr"] == pytest.approx(0.5 * np.hypot(dream["stderr"] / 0.25, real["stderr"] / 0.5))
    (d,) = out["differences"]
    assert (d["a"], d["b"]) == ("dream", "real")
    assert d["b_minus_a"] == pytest.approx(0.25)
    assert d["stderr"] == pytest.approx(np.hypot(dream["stderr"], real["stderr"]))
    # the wall share: mean over the seeds that recorded it; none recorded: NaN, printed as '-'
    assert real["mean_forward_blocked_share"] == pytest.approx(0.45) and np.isnan(real["forward_blocked_share"][2])
    assert np.isnan(dream["mean_forward_blocked_share"])
    printed = capsys.readouterr().out
    assert "real - dream: +0.250" in printed and "45%" in printed and "nan" not in printed
    dream_row = next(line for line in printed.splitlines() if line.strip().startswith("dream |"))
    assert dream_row.split("|")[4].strip() == "-"
    # a behaviour of null, or a share of null, is 'not recorded', not a broken file
    for name, behaviour in [("nullb", None), ("nulls", {"forward_blocked_share": None}), ("noshare", {"action_share": {}})]:
        (tmp_path / f"{name}-seed0").mkdir()
        (tmp_path / f"{name}-seed0" / "eval.json").write_text(
            json.dumps({"agent": {"mean": 0.2, "episodes": 64, "behaviour": behaviour}}))
        g = compare.main(compare.Args(groups=[f"{name}={tmp_path}/{name}-seed*"]))["groups"][name]
        assert g["returns"] == [0.2] and np.isnan(g["mean_forward_blocked_share"])
    # one seed: no standard error, written as null (strict JSON), not NaN; a zero mean keeps its ratio's error
    _write_eval(tmp_path / "zero-seed0", 0.0)
    _write_eval(tmp_path / "zero-seed1", 0.2)
    (tmp_path / "one.json").write_text(json.dumps({"agent": {"mean": 0.3, "episodes": 64}}))
    out = compare.main(compare.Args(groups=[f"real={tmp_path}/real-seed*", f"one={tmp_path}/one.json",
                                            f"zero={tmp_path}/zero-seed0"], json=tmp_path / "t.json"))
    written = json.loads((tmp_path / "t.json").read_text())
    assert written["groups"]["one"]["seeds"] == ["one"] and written["groups"]["one"]["stderr"] is None
    assert written["groups"]["real"]["ratio_stderr"] is None  # the reference against itself
    assert written["groups"]["real"]["forward_blocked_share"] == [0.5, 0.4, None]
    assert written["groups"]["one"]["mean_forward_blocked_share"] is None
    assert out["groups"]["zero"]["ratio"] == 0.0 and np.isnan(out["groups"]["zero"]["ratio_stderr"])  # one seed
    two = compare.main(compare.Args(groups=[f"real={tmp_path}/real-seed*", f"zero={tmp_path}/zero-seed*"]))
    zero = two["groups"]["zero"]
    assert zero["ratio_stderr"] == pytest.approx(np.hypot(zero["stderr"], zero["ratio"] * real["stderr"]) / 0.5)


def test_compare_refuses_mixed_evaluations_and_bad_files(tmp_path):
    from agents import compare

    _write_eval(tmp_path / "a-seed0", 0.2)
    _write_eval(tmp_path / "b-seed0", 0.3, max_steps=500)
    with pytest.raises(SystemExit, match="different evaluations.*max_steps 200 vs 500"):
        compare.main(compare.Args(groups=[f"a={tmp_path}/a-seed*", f"b={tmp_path}/b-seed*"]))
    _write_eval(tmp_path / "c-seed0", 0.3, episodes=16, setting=False)
    with pytest.raises(SystemExit, match="different evaluations.*episodes 64 vs 16"):
        compare.main(compare.Args(groups=[f"a={tmp_path}/a-seed*", f"c={tmp_path}/c-seed*"]))
    # an older file (no setting) first must not hide that two later ones differ
    _write_eval(tmp_path / "old-seed0", 0.2, setting=False)
    with pytest.raises(SystemExit, match="a-seed0.*b-seed0.*max_steps 200 vs 500"):
        compare.main(compare.Args(groups=[f"old={tmp_path}/old-seed*", f"a={tmp_path}/a-seed*", f"b={tmp_path}/b-seed*"]))
    with pytest.raises(SystemExit, match="group names must differ"):
        compare.main(compare.Args(groups=[f"a={tmp_path}/a-seed*", f"a={tmp_path}/old-seed*"]))
    with pytest.raises(SystemExit, match="no agent folder or file matches"):
        compare.main(compare.Args(groups=[f"a={tmp_path}/nothing-*"]))
    with pytest.raises(SystemExit, match="expected NAME=PATTERN"):
        compare.main(compare.Args(groups=[f"{tmp_path}/a-seed*"]))
    (tmp_path / "d-seed0").mkdir()
    with pytest.raises(SystemExit, match="does not exist.*agents.evaluate"):
        compare.main(compare.Args(groups=[f"d={tmp_path}/d-seed*"]))
    (tmp_path / "d-seed0" / "eval.json").write_text('{"agent": {"mean": 0.')  # truncated
    with pytest.raises(SystemExit, match="not an agents.evaluate result"):
        compare.main(compare.Args(groups=[f"d={tmp_path}/d-seed*"]))
    with pytest.raises(SystemExit, match="--reference 'x' is not one of"):
        compare.main(compare.Args(groups=[f"a={tmp_path}/a-seed*"], reference="x"))
