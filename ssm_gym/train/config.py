"""Training configuration: one dataclass (tyro turns it into the CLI) and the named presets.

The curriculum over sequence length is a list of stages, each a clip length and a number of
optimizer steps. Frames per optimizer step stay about constant (`frames_per_step`), so the
batch shrinks as clips grow; clips longer than `tbptt_frames` are trained with truncated
back-propagation over temporal chunks, the SSM state (and attention cache) carried between them.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ssm_gym.model.compression import get_compression
from ssm_gym.model.world_model import WorldModelConfig


@dataclass
class TrainConfig:
    # -- data and output
    data_dir: Path = Path("data/maze")
    """Folder of training episodes (python -m training.collect)."""
    extra_data_dirs: tuple[Path, ...] = ()
    """More folders of training episodes, sampled together with data_dir as one set (clips drawn
    uniformly over all frames), e.g. `data/maze-stumble` (`--policy-mix.stumble`: walls stopping
    the agent)."""
    val_dir: Optional[Path] = Path("data/maze-val")
    """Folder of held-out episodes (other maze seeds) for validation; None to skip validation."""
    out_dir: Path = Path("runs/maze-cpu")
    """Run folder: checkpoints/, metrics.csv, tb/ (TensorBoard), samples/ (videos), model/ (final EMA)."""
    # -- model
    model: WorldModelConfig = field(default_factory=WorldModelConfig)
    # -- curriculum over clip length
    stage_clip_lens: tuple[int, ...] = (16, 32, 64, 128)
    """Clip length (frames) of each curriculum stage."""
    stage_steps: tuple[int, ...] = (1000, 1000, 1000, 1000)
    """Optimizer steps of each stage."""
    frames_per_step: int = 128
    """Frames per optimizer step over all processes (batch = frames_per_step // clip_len, at least 1)."""
    tbptt_frames: int = 64
    """Clips longer than this are split into temporal chunks with the state carried (truncated BPTT)."""
    # -- objective
    long_context: bool = True
    """Paper's long-context training: a clean prefix longer than half the clip, loss on the rest."""
    long_context_prob: float = 0.5
    clean_history_prob: float = 0.0
    """Share of clips in which only `clean_history_noised_frac` of the frames are noised, the rest
    clean: trains prediction from a clean history, as at inference (see sample_clip_sigmas)."""
    clean_history_noised_frac: float = 0.25
    noised_copies: bool = False
    """Every frame carries loss: the clip runs clean and a noised copy of each frame is denoised from
    the clean frames before it (WorldModel.forward_paired), about twice the compute per clip frame.
    The clean-prefix options (long_context, clean_history_prob) then do not apply."""
    noised_copies_prob: float = 1.0
    """With noised_copies: the share of optimizer steps that use it; the other steps train plain
    diffusion forcing (noised histories, the long-context prefix). Why mix: copies alone give sharp
    next frames and a readable reward head but open-loop rollouts that fade (the model never sees
    its own imperfect frames as history); diffusion forcing alone holds long rollouts better but
    blurs the next frame."""
    open_loop_prob: float = 0.0
    """With noised_copies: the share of copies steps whose clean history is the model's own
    open-loop imagination after `open_loop_context` real frames (the clip's real actions; one
    denoising step), while the copies still denoise towards the real frames: trains the model to
    predict from the history it has in imagination, against the fog of compounding errors."""
    open_loop_context: int = 8
    """Real frames before the open-loop history starts (at most the clip length - 1)."""
    open_loop_reward_weight: float = 1.0
    """With open_loop_prob: weight of the reward loss of the head read on the open-loop history
    (its open_loop_context real frames and the imagined ones after them, where the env reads the
    head in imagination), next to 1 for the copies' (see
    diffusion_forcing_loss's history_reward_weight)."""
    open_loop_drop_blocked: bool = False
    """With open_loop_prob: imagine the history with every move that a wall cancelled in the real
    clip taken out (forward -> no-op, forward_left -> left, ...; from the episodes' agent_pos), so
    that the imagined agent stops where the real one did. With the real actions (the default, as
    `maze-latent-ol` was trained) the imagined history walks on through walls, and a model trained
    on it learns to as well (session 23: it stops at 1.5-11% of walls)."""
    open_loop_still_targets: bool = False
    """With open_loop_prob: where the real clip stood still (a no-op, a move a wall cancelled), the
    open-loop copies denoise towards the history's previous frame instead of the real frame (see
    `ssm_gym.model.diffusion.still_targets`): the model learns to hold its own frame where the
    world does not change, instead of pulling it towards the real one at every step."""
    action_dropout: float = 0.0
    """Share of frames whose action is replaced by the model's null action (needs
    --model.null-action): trains the action-free prediction that action guidance
    (--model.action-guidance, the envs' action_guidance) contrasts with."""
    reward_clip_prob: float = 0.0
    """Share of training clips drawn around a reward event (touching the target, under 1% of
    frames), so the model learns when touches happen and shows them (0: uniform clips)."""
    blocked_clip_prob: float = 0.0
    """Share of training clips drawn around a move that a wall cancelled (needs agent_pos in the
    episodes): with the open-loop fixes above, more frames where the world stood still while
    the imagined agent pushed on, the case the model gets wrong (0: uniform clips)."""
    reward_loss_weight: float = 1.0
    """Weight of the reward head's loss next to the frame loss."""
    object_loss_weight: float = 0.0
    """Extra weight of the positions that show a ball in each frame's denoising loss (1 + this
    there, 1 elsewhere; a weighted mean per frame). Balls are under 1% of the pixels and the
    models lose them within a few imagined steps (`python -m ssm_gym.eval.reward_sight`); 0: off."""
    compression: str = "off"
    """Dynamic state compression trained in (ssm_gym/model/compression.py): a setting name such as
    "strong"; its content rule masks the SSM state prefixes and the attention cache of a share of clips."""
    compression_prob: float = 0.5
    """Share of training clips that get the compression masks (the rest train the exact model)."""
    # -- optimisation
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to lr * min_lr_ratio."""
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    """EMA of the weights; the EMA weights are the ones saved for sampling."""
    amp: bool = True
    """bf16 autocast on CPU (and CUDA)."""
    compile: bool = False
    """torch.compile the model."""
    # -- bookkeeping
    seed: int = 0
    device: str = "cpu"
    threads: Optional[int] = None
    """torch threads per process (default: torch's choice)."""
    log_every: int = 10
    ckpt_every: int = 200
    keep_checkpoints: int = 3
    val_every: int = 500
    val_episodes: int = 4
    val_context: int = 32
    """Real frames the model sees before predicting, in validation."""
    val_horizon: int = 100
    """Frames generated open-loop in validation (the n-step PSNR is at this horizon)."""
    sample_every: int = 1000
    """Write a real-vs-predicted video every this many steps (0: never)."""
    resume: bool = False
    """Continue the run in out_dir from its latest checkpoint."""
    init_from: Optional[Path] = None
    """Start from the weights of this model (fine-tuning; a model folder, a run folder or a shipped
    model's name): the model config must match; optimizer, schedule and data order start fresh."""
    autoencoder: Optional[Path] = None
    """A trained frame autoencoder (python -m training.train_autoencoder; its model/ folder) for a
    new latent-space model (--model.latent-channels > 0); frozen. A fine-tune (--init-from) of a
    latent model takes its autoencoder from the loaded model instead."""
    time_budget_s: Optional[float] = None
    """Train for this many seconds of wall time instead of a number of steps (for a lent machine
    with a fixed time): curriculum stages and the learning-rate schedule then follow the elapsed
    fraction of the budget, `stage_steps` giving the stages' relative lengths. Such a run resumes
    with its remaining time, but not bit-exactly (step counts depend on the machine)."""

    @property
    def total_steps(self) -> int:
        return sum(self.stage_steps)

    def step_objective(self, step: int) -> tuple[bool, bool]:
        """``(noised copies, open-loop history)`` for optimizer step ``step`` (see noised_copies_prob,
        open_loop_prob): drawn from the seed and the step alone, so every process of a
        data-parallel run and a resumed run agree."""
        draw = random.Random(self.seed * 1_000_003 + step)
        copies = self.noised_copies and draw.random() < self.noised_copies_prob
        return copies, copies and draw.random() < self.open_loop_prob

    def stage_at(self, step: int) -> int:
        edge = 0
        for i, n in enumerate(self.stage_steps):
            edge += n
            if step < edge:
                return i
        return len(self.stage_steps) - 1

    def progress(self, step: int, elapsed_s: float) -> float:
        """Fraction of the run done: by steps, or by wall time under `time_budget_s`."""
        if self.time_budget_s is not None:
            return elapsed_s / self.time_budget_s
        return step / self.total_steps

    def stage_at_progress(self, fraction: float) -> int:
        """Curriculum stage at a fraction of the run (stage lengths in proportion to stage_steps)."""
        return self.stage_at(min(self.total_steps - 1, int(fraction * self.total_steps)))

    def validate(self) -> None:
        if len(self.stage_clip_lens) != len(self.stage_steps) or not self.stage_steps:
            raise ValueError(f"stage_clip_lens {self.stage_clip_lens} and stage_steps {self.stage_steps} must be non-empty and of equal length")
        if min(self.stage_clip_lens) < 2:
            raise ValueError("clips need at least 2 frames")
        for name in ("tbptt_frames", "frames_per_step", "log_every", "ckpt_every", "keep_checkpoints", "val_every",
                     "val_episodes", "val_context", "val_horizon"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sample_every < 0 or min(self.stage_steps) < 1:
            raise ValueError("sample_every must be >= 0 and every stage needs >= 1 step")
        get_compression(self.compression)  # a clear error for an unknown setting
        if not self.object_loss_weight >= 0.0:
            raise ValueError(f"object_loss_weight must be >= 0, got {self.object_loss_weight}")
        if not 0.0 <= self.compression_prob <= 1.0:
            raise ValueError(f"compression_prob must be in [0, 1], got {self.compression_prob}")
        if not 0.0 <= self.clean_history_prob <= 1.0:
            raise ValueError(f"clean_history_prob must be in [0, 1], got {self.clean_history_prob}")
        if not 0.0 < self.clean_history_noised_frac <= 1.0:
            raise ValueError(f"clean_history_noised_frac must be in (0, 1], got {self.clean_history_noised_frac}")
        if not 0.0 <= self.noised_copies_prob <= 1.0:
            raise ValueError(f"noised_copies_prob must be in [0, 1], got {self.noised_copies_prob}")
        if self.noised_copies_prob < 1.0 and not self.noised_copies:
            raise ValueError("noised_copies_prob mixes noised copies with diffusion forcing: set --noised-copies too")
        if not 0.0 <= self.open_loop_prob <= 1.0:
            raise ValueError(f"open_loop_prob must be in [0, 1], got {self.open_loop_prob}")
        if self.open_loop_prob > 0 and not self.noised_copies:
            raise ValueError("open_loop_prob trains noised copies on an imagined history: set --noised-copies too")
        for flag in ("open_loop_drop_blocked", "open_loop_still_targets"):
            if getattr(self, flag) and self.open_loop_prob == 0:
                raise ValueError(f"{flag} changes the open-loop steps: set --open-loop-prob > 0 too")
        if self.open_loop_reward_weight < 0:
            raise ValueError(f"open_loop_reward_weight must be >= 0, got {self.open_loop_reward_weight}")
        if self.open_loop_reward_weight != 1.0 and self.open_loop_prob == 0:
            raise ValueError("open_loop_reward_weight weights the open-loop steps' reward loss: set --open-loop-prob > 0 too")
        if self.open_loop_context < 1:
            raise ValueError(f"open_loop_context must be >= 1, got {self.open_loop_context}")
        if self.noised_copies and self.clean_history_prob > 0:
            raise ValueError("noised_copies gives every frame a clean history already: set clean_history_prob to 0")
        if self.noised_copies and self.compression != "off" and get_compression(self.compression).dynamic:
            raise ValueError("noised_copies does not support training with state compression (compression='off')")
        if not 0.0 <= self.action_dropout <= 1.0:
            raise ValueError(f"action_dropout must be in [0, 1], got {self.action_dropout}")
        if self.action_dropout > 0 and not self.model.null_action:
            raise ValueError("action_dropout needs a model with the null action (--model.null-action)")
        if self.model.latent_channels and (self.autoencoder is None) == (self.init_from is None):
            raise ValueError("a latent-space model (--model.latent-channels > 0) needs exactly one of --autoencoder "
                             "(a new model) or --init-from (a fine-tune: its autoencoder comes with it)")
        if self.autoencoder is not None and not self.model.latent_channels:
            raise ValueError("--autoencoder is for a latent-space model: set --model.latent-channels")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError(f"time_budget_s must be > 0, got {self.time_budget_s}")


def _tiny_model() -> WorldModelConfig:
    return WorldModelConfig(d_model=32, n_layers=2, n_heads=2, d_state=8, ssm_headdim=16, ssm_chunk_size=16,
                            block_sizes=((2, 2), (4, 4)), attn_window=3, sample_steps=2)


PRESETS: dict[str, tuple[str, TrainConfig]] = {
    "tiny": (
        "A few-second run on a tiny model, for tests and smoke checks.",
        TrainConfig(out_dir=Path("runs/tiny"), model=_tiny_model(), stage_clip_lens=(4, 8), stage_steps=(6, 6),
                    frames_per_step=16, tbptt_frames=4, warmup_steps=2, ckpt_every=4, val_every=6,
                    val_episodes=2, val_context=4, val_horizon=4, sample_every=0, log_every=2, amp=False),
    ),
    "maze-cpu": (
        "The shipped model's size (2.8M parameters) on a CPU: 3,200 steps, in bf16 autocast (with the fused "
        "attention kernel 2.2x fp32 on a CPU with AVX-512 BF16, at the same quality per step; pass --no-amp "
        "on a CPU without it, where bf16 is slower).",
        TrainConfig(stage_steps=(1000, 1000, 800, 400), amp=True, ckpt_every=100, val_every=400, sample_every=800),
    ),
    "maze-timed": (
        "The shipped model's size, trained for a fixed wall time (--time-budget-s) on a lent GPU: "
        "curriculum 16 -> 256 frames in equal shares of the time, 1,024 frames per step. The baselines "
        "of the recall benchmark use it too (training/baselines.py).",
        TrainConfig(out_dir=Path("runs/maze-timed"), device="cuda", time_budget_s=300.0,
                    stage_clip_lens=(16, 32, 64, 128, 256), stage_steps=(1, 1, 1, 1, 1), frames_per_step=1024,
                    tbptt_frames=128, lr=6e-4, warmup_steps=100, amp=False, ckpt_every=100, val_every=200,
                    sample_every=0),
    ),
    "maze-gpu": (
        "A bigger model for one GPU.",
        TrainConfig(out_dir=Path("runs/maze-gpu"), device="cuda",
                    model=WorldModelConfig(d_model=384, n_layers=12, n_heads=6, d_state=64, ssm_headdim=64),
                    stage_clip_lens=(16, 32, 64, 128, 256, 512), stage_steps=(5000, 5000, 5000, 5000, 5000, 5000),
                    frames_per_step=1024, tbptt_frames=256),
    ),
}


def config_to_json(cfg) -> dict:
    """A (flat) dataclass config as JSON-ready fields: paths as strings."""
    d = dataclasses.asdict(cfg)
    plain = lambda v: str(v) if isinstance(v, Path) else v  # noqa: E731
    return {k: [plain(x) for x in v] if isinstance(v, (tuple, list)) else plain(v) for k, v in d.items()}
