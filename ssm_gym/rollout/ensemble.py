"""Several world models imagining the same episodes: one drives, the others say where they disagree.

An agent trained in imagination is paid for steering the imagined world where the model is
wrong (walking on through a wall the real maze would stop it at, drifting towards what the
reward head misreads as a target; README, Agents). Model-based RL's usual guard (MOPO, MBPO's
ensembles, the disagreement bonus of Plan2Explore turned into a penalty) is to measure where
several models disagree about the next frame and pay less there.

`EnsembleEngine` wraps a driving `RolloutEngine` and member engines over the same envs. Every
step, each member first predicts the next frame from its own state (`RolloutEngine.predict`), the
driver then imagines the frame the env shows, and every member advances on that frame
(`observe`), so all members follow the one imagined episode. `disagreement` (N,) is the mean
absolute pixel difference, in [0, 1], between the driver's frame and the members' predictions
(averaged over members). It has the part of the engine's interface that the envs use (`reset`,
`step`, `fork`, `frames`, `steps`, `num_envs`, `device`, `model`, `state_nbytes`), so
`SSMWorld-Maze-v0` takes it as it is (`ensemble=[...]`, `disagreement_penalty=...`); not
`predict` / `observe` (no planner runs on an ensemble yet).

Cost: each member adds a denoising pass, the decoder, the encoder and an observe pass per
step, about 1.2 times the driver's step.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ssm_gym.rollout.engine import RolloutEngine


class EnsembleEngine:
    def __init__(self, driver: RolloutEngine, members: Sequence[RolloutEngine]):
        members = list(members)
        if not members:
            raise ValueError("an ensemble needs at least one member besides the driver")
        for k, m in enumerate(members):
            if m.num_envs != driver.num_envs or m.device != driver.device or m.frame_shape != driver.frame_shape:
                raise ValueError(f"ensemble member {k} ({m.num_envs} envs of {m.frame_shape} on {m.device}) does not "
                                 f"match the driver ({driver.num_envs} envs of {driver.frame_shape} on {driver.device})")
        self.driver, self.members = driver, members
        self.disagreement = torch.zeros(driver.num_envs, device=driver.device)

    # what the envs and planners read from an engine
    @property
    def num_envs(self) -> int:
        return self.driver.num_envs

    @property
    def device(self) -> torch.device:
        return self.driver.device

    @property
    def model(self):
        return self.driver.model

    @property
    def frames(self) -> Tensor:
        return self.driver.frames

    @property
    def steps(self) -> Tensor:
        return self.driver.steps

    def state_nbytes(self) -> int:
        return self.driver.state_nbytes() + sum(m.state_nbytes() for m in self.members)

    def reset(self, mask: Tensor, first_frames: Tensor, context_actions: Optional[Tensor] = None,
              seeds: Optional[list[int]] = None) -> Tensor:
        """As `RolloutEngine.reset`, for the driver and every member (members' noise seeds offset)."""
        frames = self.driver.reset(mask, first_frames, context_actions, seeds)
        for k, m in enumerate(self.members, 1):
            m.reset(mask, first_frames, context_actions, None if seeds is None else [s + k for s in seeds])
        mask = torch.as_tensor(mask, dtype=torch.bool, device=self.device)
        self.disagreement = torch.where(mask, 0.0, self.disagreement)  # a new tensor: step's are inference tensors
        return frames

    @torch.inference_mode()
    def step(self, actions) -> tuple[Tensor, Tensor, Tensor]:
        """The driver's `step`; sets `disagreement` (N,) for this step."""
        predictions = [m.predict(actions) for m in self.members]  # before the driver's frame exists
        frames, rewards, terminated = self.driver.step(actions)
        for m in self.members:
            m.observe(frames, actions)
        self.disagreement = frame_disagreement(frames, predictions)
        return frames, rewards, terminated

    def fork(self, idx, cuda_graph: bool = False) -> "EnsembleEngine":
        """As `RolloutEngine.fork`, for the driver and every member."""
        new = EnsembleEngine(self.driver.fork(idx, cuda_graph), [m.fork(idx, cuda_graph) for m in self.members])
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.device).flatten()
        new.disagreement = self.disagreement.index_select(0, idx).clone()
        return new


def frame_disagreement(frames: Tensor, predictions: Sequence[Tensor]) -> Tensor:
    """Mean absolute difference in [0, 1] between uint8 frames (N, H, W, C) and each prediction of
    them, averaged over the predictions: (N,)."""
    ref = frames.float()
    return torch.stack([(p.float() - ref).abs().mean(dim=(1, 2, 3)) for p in predictions]).mean(0) / 255.0
