"""Train a PPO agent in imagination (the world model) or in the real maze, with stable-baselines3.

    python -m agents.ppo --checkpoint runs/maze-cpu/model --total-steps 100000          # imagination
    python -m agents.ppo --env real --total-steps 100000                                  # real maze
    python -m agents.ppo --checkpoint ... --recurrent                                     # RecurrentPPO (LSTM)
    python -m agents.ppo --context-data data/maze --max-episode-steps 32                  # short imagined horizons from real data
    python -m agents.ppo --env real --context-data data/maze --max-episode-steps 32       # the same starts, real dynamics

The agent is evaluated in the *real* maze every `--eval-every` env steps (held-out seeds); the
learning curve (real-maze return vs env steps) goes to `curve.csv` and `curve.png`, the agent to
`agent.zip` (load it with `PPO.load` / `RecurrentPPO.load`), all in `--out-dir`.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import tyro
from stable_baselines3.common.callbacks import BaseCallback

import ssm_gym  # noqa: F401
from agents.evaluate import real_returns, sb3_act_fn, summary
from ssm_gym.envs.sb3 import SB3VecEnv


@dataclass
class Args:
    env: Literal["imagination", "real"] = "imagination"
    checkpoint: Optional[Path] = None
    """World model for --env imagination: a folder or a shipped model's name (default: the shipped default model, ssm_gym.checkpoints.DEFAULT)."""
    total_steps: int = 100_000
    num_envs: int = 16
    max_episode_steps: int = 200
    """Episode length while training (shorter than the maze's 1000 keeps returns informative)."""
    sampling_steps: Optional[int] = 1
    """Denoising steps of the world model (1 = fast mode)."""
    action_guidance: Optional[float] = None
    """Classifier-free guidance on the action (None = the model's default; needs a model trained
    with the null action; see SSMWorld-Maze-v0's action_guidance)."""
    reward_mode: Literal["threshold", "soft", "expected", "real"] = "threshold"
    """Imagined rewards: the head on the generated frame, thresholded (default) or paid as read
    ("soft", clipped to [0, 1]), or the expected
    reward from history and action (see SSMWorld-Maze-v0's reward_mode); "real" pays what the
    ground-truth maze stepped beside the imagined one pays (a control: imagined observations,
    true rewards; not training in imagination alone)."""
    reward_threshold: Optional[float] = None
    """With --reward-mode threshold: the head's value above which a step pays 1 (default: the env's,
    0.5; a model whose head ranks touches well but reads them low on generated frames pays more of
    them at a lower one)."""
    reward_baseline: Literal["none", "model"] = "none"
    """With --reward-mode expected: "model" subtracts from each action's expected reward the model's
    own mean expected reward for that action over real states of --context-data (measured at the
    start, written to reward_baseline.json), so that no action pays by itself: the head learns that
    touches follow moves, and an agent otherwise learns to repeat the most-favoured action."""
    ensemble: tuple[str, ...] = ()
    """More world models (names or folders) that follow the imagined episodes and predict each
    frame from their own state (SSMWorld-Maze-v0's ensemble); their disagreement with the frame
    shown is logged in curve.csv."""
    disagreement_penalty: float = 0.0
    """Subtract this times the ensemble's disagreement (mean absolute pixel difference in [0, 1])
    from every imagined step's reward: less pay where the models disagree (MOPO-style)."""
    baseline_episodes: int = 16
    """Episodes of --context-data (8 states each, after --context-len real frames) for the baseline."""
    context_data: Optional[Path] = None
    """Start imagined episodes after real history drawn from this dataset folder (e.g. data/maze,
    the model's training data), as DIAMOND / IRIS / Dreamer do; pair with a short
    --max-episode-steps (the imagination horizon, e.g. 32). With --env real: start the real maze at
    the same recorded moments (the control for short imagined episodes: true dynamics)."""
    context_len: int = 32
    """Real frames the model is warmed up on at each start (with --context-data)."""
    cuda_graph: bool = False
    """With --device cuda: step the imagined envs by replaying a CUDA graph (several times faster
    for up to a few hundred envs; see benchmarks/rollout.py)."""
    precision: str = "fp32"
    """Imagined envs' model precision: "bf16" is 2.2x the env-steps/s at 16 envs on a CPU with AVX-512 BF16
    (see ssm_gym/rollout/engine.py)."""
    recurrent: bool = False
    """sb3-contrib RecurrentPPO with an LSTM (the maze rewards memory)."""
    n_steps: int = 64
    batch_size: int = 256
    n_epochs: int = 4
    learning_rate: float = 3e-4
    ent_coef: float = 0.01
    seed: int = 0
    device: str = "cpu"
    time_budget_s: Optional[float] = None
    """Stop training after this many seconds of wall time even before total_steps (then evaluate and save)."""
    eval_every: int = 10_000
    eval_episodes: int = 8
    eval_max_steps: int = 200
    eval_first_seed: int = 3_000_000
    out_dir: Path = Path("outputs/agents/ppo")


def model_reward_baseline(args: Args, model) -> list[float]:
    """The model's mean expected reward per action over real states (see --reward-baseline)."""
    import torch

    from ssm_gym.eval.prediction import action_sensitivity, load_clips

    if args.reward_mode != "expected" or args.context_data is None:
        raise ValueError("--reward-baseline model needs --reward-mode expected and --context-data (the real states)")
    positions = 8
    clips = load_clips(args.context_data, args.baseline_episodes, args.context_len + positions)
    with torch.no_grad():
        res = action_sensitivity(model, clips.frames, clips.prev_actions, args.context_len, positions,
                                 args.sampling_steps, args.seed, args.action_guidance)
    (args.out_dir / "reward_baseline.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"reward baseline per action (mean expected reward over {res['samples']} real states): "
          f"{res['expected_reward_by_action']}; each action the highest in {res['expected_reward_argmax_share']}")
    return res["expected_reward_by_action"]


def make_env(args: Args) -> SB3VecEnv:
    common = dict(num_envs=args.num_envs, max_episode_steps=args.max_episode_steps, autoreset_mode="SameStep")
    if args.env == "real":
        if (args.reward_mode != "threshold" or args.reward_baseline != "none" or args.reward_threshold is not None
                or args.ensemble or args.disagreement_penalty):
            raise ValueError("--reward-mode, --reward-threshold, --reward-baseline, --ensemble and "
                             "--disagreement-penalty choose imagined rewards; --env real pays the real maze's")
        return SB3VecEnv(gym.make_vec("SSMWorld-MazeReal-v0", context_data=args.context_data,
                                      context_len=args.context_len, **common))
    if args.reward_threshold is not None and args.reward_mode != "threshold":
        raise ValueError(f"--reward-threshold applies to --reward-mode threshold, not {args.reward_mode!r}")
    from ssm_gym.checkpoints import load_world_model

    model = load_world_model(args.checkpoint, args.device)  # once, for the baseline and the env
    baseline = model_reward_baseline(args, model) if args.reward_baseline == "model" else None
    return SB3VecEnv(gym.make_vec("SSMWorld-Maze-v0", model=model, device=args.device,
                                  sampling_steps=args.sampling_steps, reward_mode=args.reward_mode,
                                  **({} if args.reward_threshold is None else {"reward_threshold": args.reward_threshold}),
                                  context_data=args.context_data, context_len=args.context_len,
                                  cuda_graph=args.cuda_graph, action_guidance=args.action_guidance,
                                  reward_baseline=baseline, precision=args.precision, ensemble=args.ensemble,
                                  disagreement_penalty=args.disagreement_penalty, **common))


class RealMazeCurve(BaseCallback):
    """Evaluates the agent in the real maze every `every` env steps; writes curve.csv. Each row
    also has the mean reward paid per training step since the last row and, in imagination, what
    the real maze beside the imagined envs paid for the same actions (`info["reward_real"]`; NaN
    where it cannot follow the start): paid far above real is an agent exploiting the model. With
    an ensemble, also the mean disagreement of the models per step (`info["disagreement"]`)."""

    def __init__(self, args: Args):
        super().__init__()
        self.args, self.next_eval = args, 0
        self.seeds = list(range(args.eval_first_seed, args.eval_first_seed + args.eval_episodes))
        self.rows: list[dict] = []
        self.t0 = time.perf_counter()
        self.paid, self.real, self.disagreement = [], [], []  # per step since the last row

    def evaluate(self) -> None:
        s = summary(real_returns(sb3_act_fn(self.model), self.seeds, self.args.eval_max_steps))
        real = np.array(self.real, dtype=float)
        row = {"env_steps": self.num_timesteps, "real_return": round(s["mean"], 3), "stderr": round(s["stderr"], 3),
               "wall_s": round(time.perf_counter() - self.t0, 1),
               "paid_per_step": round(float(np.mean(self.paid)), 5) if self.paid else float("nan"),
               "real_per_step": round(float(np.nanmean(real)), 5) if np.isfinite(real).any() else float("nan")}
        if self.args.ensemble:
            row["disagreement"] = round(float(np.mean(self.disagreement)), 5) if self.disagreement else float("nan")
        self.paid, self.real, self.disagreement = [], [], []
        self.rows.append(row)
        path = self.args.out_dir / "curve.csv"
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            w.writeheader()
            w.writerows(self.rows)
        if self.verbose:
            print(f"env steps {row['env_steps']}: real-maze return {row['real_return']:.2f} +- {row['stderr']:.2f}")

    def _on_step(self) -> bool:
        rewards = np.asarray(self.locals["rewards"], dtype=float)
        self.paid.extend(rewards.tolist())
        real_env = self.args.env == "real"
        self.real.extend(r if real_env else info.get("reward_real", float("nan"))
                         for r, info in zip(rewards, self.locals["infos"]))
        if self.args.ensemble:
            self.disagreement.extend(info["disagreement"] for info in self.locals["infos"])
        if self.num_timesteps >= self.next_eval:
            self.evaluate()
            self.next_eval += self.args.eval_every
        budget = self.args.time_budget_s
        return budget is None or time.perf_counter() - self.t0 < budget  # False stops SB3's learn()


def plot_curve(rows: list[dict], path: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["env_steps"] for r in rows]
    y = np.array([r["real_return"] for r in rows])
    e = np.array([r["stderr"] for r in rows])
    ax.plot(x, y, marker="o", label=label)
    ax.fill_between(x, y - e, y + e, alpha=0.2)
    ax.set_xlabel("env steps (training)")
    ax.set_ylabel("return in the real maze")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(args: Args) -> Path:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    venv = make_env(args)
    venv.seed(args.seed)
    common = dict(n_steps=args.n_steps, batch_size=args.batch_size, n_epochs=args.n_epochs, learning_rate=args.learning_rate,
                  ent_coef=args.ent_coef, seed=args.seed, device=args.device, verbose=0)
    if args.recurrent:
        from sb3_contrib import RecurrentPPO

        agent = RecurrentPPO("CnnLstmPolicy", venv, **common)
    else:
        from stable_baselines3 import PPO

        agent = PPO("CnnPolicy", venv, **common)
    curve = RealMazeCurve(args)
    t0 = time.perf_counter()
    agent.learn(total_timesteps=args.total_steps, callback=curve, progress_bar=True)
    train_s = time.perf_counter() - t0
    curve.evaluate()
    path = args.out_dir / "agent.zip"
    agent.save(path)
    label = f"{'RecurrentPPO' if args.recurrent else 'PPO'} in {args.env}"
    plot_curve(curve.rows, args.out_dir / "curve.png", label)
    print(f"{label}: {agent.num_timesteps} env steps in {train_s:.0f} s "
          f"({train_s / max(agent.num_timesteps, 1) * 1e6 / 3600:.1f} h per 1M env steps incl. evaluation); "
          f"final real-maze return {curve.rows[-1]['real_return']:.2f}; saved {path}")
    return path


if __name__ == "__main__":
    train(tyro.cli(Args))
