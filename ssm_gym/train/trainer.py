"""The training loop: curriculum over clip length, diffusion forcing with long-context training,
truncated BPTT with the state carried, EMA, checkpoints that resume exactly, validation, logs.

Read `train()` top to bottom: setup, resume, then one optimizer step per iteration. Data-parallel
over processes when started by `torchrun` (gloo on CPU, nccl on CUDA): each process draws its own
clips, gradients are averaged, process 0 writes everything.

Run folder (`cfg.out_dir`):
    train_config.json          the full config (a resumed run must match it)
    checkpoints/step_XXXXXXX/  model/ (EMA weights, loadable by ssm_gym.model.checkpoint.load_model),
                               raw.safetensors (training weights), train_state.pt (optimizer, RNGs, step)
    checkpoints/latest         name of the newest complete checkpoint
    metrics.csv, val.csv       one row per logged step / validation (val: PSNRs and action sensitivity)
    tb/                        TensorBoard events
    samples/step_XXXXXXX.mp4   real | open-loop prediction | one-step prediction
    model/                     final EMA model
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ssm_gym.maze.dataset import ClipDataset
from ssm_gym.model.checkpoint import (
    CheckpointError,
    check_state_dict,
    config_from_dict,
    load_autoencoder,
    save_model,
    write_folder_atomically,
)
from ssm_gym.model.compression import clip_compression, get_compression
from ssm_gym.model.attention import attention_kernel
from ssm_gym.model.diffusion import (diffusion_forcing_loss, drop_actions, object_loss_weights, open_loop_history,
                                     sample_clip_sigmas, still_targets)
from ssm_gym.model.ssm import cpu_kernel
from ssm_gym.model.world_model import WorldModel
from ssm_gym.train.config import TrainConfig, config_to_json


# ---------------------------------------------------------------------------------------------
# Small pieces


class EMA:
    """Exponential moving average of parameters and buffers (float32 copies)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # short memory early on
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.float(), 1 - d)
            else:
                self.shadow[k].copy_(v)


def lr_at(cfg: TrainConfig, step: int, elapsed_s: float = 0.0) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at the end of the run (the last
    step, or the end of `time_budget_s`)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.time_budget_s is not None:
        progress = cfg.progress(step, elapsed_s)
    else:
        progress = (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]  # (a latent model's autoencoder is frozen)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))


# WorldModelConfig fields a fine-tune (--init-from) may change: they do not change what the weights
# compute (training noise levels, sampling schedule, kernels and chunking of the same maths)
INIT_FROM_FREE_FIELDS = ("p_mean", "p_std", "sample_steps", "sigma_min", "sigma_max", "rho", "backend",
                         "ssm_chunk_size", "attn_chunk_frames", "action_guidance")


# Fields a fine-tune may switch on, with the parameters each adds: they start at zero (the loaded
# model's output is unchanged at the start) and are the only tensors the start model may lack.
INIT_FROM_GROW_FIELDS = {"action_tokens": "action_tok.", "prev_frame": "prev_in.", "null_action": "action_null",
                         "pixel_head": "pixel_refine."}


def load_codec(model: WorldModel, path: Path) -> None:
    """Put the trained autoencoder in folder ``path`` into a new latent-space model (frozen)."""
    ae = load_autoencoder(path)
    if model.codec is None:
        raise ValueError(f"--autoencoder {path}: the model is in pixel space; set --model.latent-channels "
                         f"{ae.latent_channels} (and --model.latent-downsample / --model.latent-width to match)")
    want, got = model.codec.fields, ae.fields  # (the model's codec is built from its config)
    if want != got:
        raise ValueError(f"--autoencoder {path}: it does not match the model config: "
                         + ", ".join(f"{k} {got[k]} vs {want[k]}" for k in want if want[k] != got[k]))
    model.codec.load_state_dict(ae.state_dict())


def mismatch(a, b) -> str:
    """The fields in which two dataclass configs differ, for error messages."""
    return ", ".join(f"{f.name}: {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}"
                     for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name))


def temporal_chunks(length: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, length)) for s in range(0, length, chunk)]


class Distributed:
    """Process group from torchrun's environment variables, or a single process."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local}" if device == "cuda" and self.world > 1 else device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Checkpoints of a run


def checkpoint_dir(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = checkpoint_dir(out_dir) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoint_dir(out_dir) / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer}: points to {path.name}, which does not exist")
    return path


def save_checkpoint(out_dir: Path, step: int, model, ema: EMA, opt, data_rng, noise_gen, meta: dict, keep: int,
                    elapsed_s: float = 0.0) -> Path:
    name = f"step_{step:07d}"
    path = checkpoint_dir(out_dir) / name

    def write(folder: Path) -> None:
        save_model(folder / "model", model, meta={**meta, "step": step, "weights": "ema"}, state_dict=ema.shadow)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(folder / "raw.safetensors"))
        torch.save({"step": step, "elapsed_s": elapsed_s, "optimizer": opt.state_dict(), "data_rng": data_rng.bit_generator.state,
                    "noise_gen": noise_gen.get_state(), "torch_rng": torch.get_rng_state()}, folder / "train_state.pt")

    write_folder_atomically(path, write)
    pointer = checkpoint_dir(out_dir) / "latest"
    tmp = pointer.with_suffix(".tmp")
    tmp.write_text(name + "\n")
    os.replace(tmp, pointer)
    old = sorted(p for p in checkpoint_dir(out_dir).glob("step_*") if p.is_dir())[:-keep]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return path


def load_checkpoint(path: Path, model, ema: EMA, opt, data_rng, noise_gen) -> tuple[int, float]:
    """Restore everything saved by `save_checkpoint`; returns the step to continue from and the
    training time spent so far (seconds)."""
    try:
        raw = load_file(str(path / "raw.safetensors"))
        ema_w = load_file(str(path / "model" / "model.safetensors"))
        state = torch.load(path / "train_state.pt", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: incomplete checkpoint ({e.filename} missing)") from None
    except Exception as e:  # safetensors / pickle errors on a damaged file
        raise CheckpointError(f"{path}: corrupt checkpoint ({type(e).__name__}: {e})") from None
    check_state_dict(model, raw, str(path / "raw.safetensors"))
    check_state_dict(model, ema_w, str(path / "model" / "model.safetensors"))
    model.load_state_dict(raw)
    ema.shadow = {k: v.float() if v.dtype.is_floating_point else v for k, v in ema_w.items()}
    opt.load_state_dict(state["optimizer"])
    data_rng.bit_generator.state = state["data_rng"]
    noise_gen.set_state(state["noise_gen"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), float(state.get("elapsed_s", 0.0))


def prepare_run_dir(cfg: TrainConfig) -> None:
    """A new run never overwrites an old one; a resumed run must have the same config."""
    cfg_file = cfg.out_dir / "train_config.json"
    now = json.loads(json.dumps(config_to_json(cfg)))  # tuples -> lists, as read back from disk
    if cfg.resume:
        if not cfg_file.is_file():
            raise FileNotFoundError(f"--resume: {cfg_file} not found; nothing to resume in {cfg.out_dir}")
        before = json.loads(cfg_file.read_text())
        config_from_dict(before["model"], str(cfg_file))  # the old model config must still be readable
        ignore = {"resume", "threads"}  # how this process runs, not what it trains
        # a field added to the code since the run began reads as its default there
        defaults = json.loads(json.dumps(config_to_json(TrainConfig())))
        diff = sorted(k for k in set(before) | set(now)
                      if k not in ignore and before.get(k, defaults.get(k)) != now.get(k))
        if diff:
            raise ValueError(f"--resume: config differs from the run in {cfg.out_dir} in {diff}; "
                             f"resume with the same settings or start a new out_dir")
        return
    if cfg_file.exists() or (checkpoint_dir(cfg.out_dir).exists() and any(checkpoint_dir(cfg.out_dir).iterdir())):
        raise FileExistsError(f"{cfg.out_dir} already holds a run; pass --resume to continue it or choose another --out-dir")
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(json.dumps(now, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Validation


def load_validation_set(cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    from ssm_gym.eval.prediction import load_clips

    if cfg.val_dir is None:
        return None
    return load_clips(cfg.val_dir, cfg.val_episodes, cfg.val_context + cfg.val_horizon)


def validate(cfg: TrainConfig, model: WorldModel, val, step: int, out_dir: Path, write_video: bool) -> dict:
    from ssm_gym.eval.prediction import action_sensitivity, prediction_metrics, predict_episodes, side_by_side_video

    was_training = model.training
    model.eval()
    pred = predict_episodes(model, val[0], val[1], cfg.val_context, cfg.val_horizon, seed=step)
    # does the imagined frame depend on the action? (the check that says whether agents can learn)
    actions = action_sensitivity(model, val[0], val[1], cfg.val_context, min(4, cfg.val_horizon), seed=step)
    model.train(was_training)
    metrics = {**prediction_metrics(pred), **actions}
    if write_video:
        import imageio.v2 as imageio

        (out_dir / "samples").mkdir(exist_ok=True)
        imageio.mimwrite(out_dir / "samples" / f"step_{step:07d}.mp4", side_by_side_video(pred), fps=10, macro_block_size=1)
    return metrics


class CSVLog:
    def __init__(self, path: Path, fields: list[str]):
        self.path, self.fields = path, fields
        if not path.exists():
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(fields)
            return
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
        if reader.fieldnames != fields:  # a run from an older version resumed: same columns by name, new ones empty
            with path.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(fields)
                w.writerows([[r.get(k) or "" for k in fields] for r in rows])

    def write(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([row.get(k, "") for k in self.fields])

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint (they will be logged again)."""
        with self.path.open() as f:
            rows = list(csv.reader(f))
        keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
        with self.path.open("w", newline="") as f:
            csv.writer(f).writerows(keep)


# ---------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig) -> Path:
    cfg.validate()
    env = Distributed(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + env.rank)
    if env.device.type == "cuda":  # TF32 matmuls: several times faster on recent GPUs, ample for training
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if env.main:
        prepare_run_dir(cfg)
    env.barrier()

    model = WorldModel(cfg.model)
    if cfg.init_from is not None:
        from ssm_gym.checkpoints import load_world_model

        start_model = load_world_model(cfg.init_from)
        # fields that only steer training noise, sampling or execution may differ (e.g. a fine-tune
        # with another noise distribution); the network's own fields must match
        free = {k: getattr(cfg.model, k) for k in INIT_FROM_FREE_FIELDS}
        grow = [k for k in INIT_FROM_GROW_FIELDS if getattr(cfg.model, k) and not getattr(start_model.config, k)]
        free.update({k: getattr(cfg.model, k) for k in grow})
        if dataclasses.replace(start_model.config, **free) != cfg.model:
            raise ValueError(f"--init-from {cfg.init_from}: its model config differs from this run's "
                             f"({mismatch(start_model.config, cfg.model)})")
        missing, unexpected = model.load_state_dict(start_model.state_dict(), strict=False)
        grown = {n for n, _ in model.named_parameters() if n.startswith(tuple(INIT_FROM_GROW_FIELDS[k] for k in grow))}
        if unexpected or set(missing) - grown:
            raise ValueError(f"--init-from {cfg.init_from}: weights do not fit this run's model "
                             f"(missing {sorted(set(missing) - grown)[:3]}, unexpected {unexpected[:3]})")
    if cfg.autoencoder is not None:
        load_codec(model, cfg.autoencoder)
    model = model.to(env.device)
    ema = EMA(model, cfg.ema_decay)
    opt = make_optimizer(model, cfg)
    data_rng = np.random.default_rng([cfg.seed, env.rank])
    noise_gen = torch.Generator(device=env.device).manual_seed(cfg.seed * 1000 + env.rank)
    start, elapsed_before = 0, 0.0
    if cfg.resume:
        ckpt = latest_checkpoint(cfg.out_dir)
        if ckpt is not None:
            start, elapsed_before = load_checkpoint(ckpt, model, ema, opt, data_rng, noise_gen)
            # Each process resumes its own streams: re-seed the per-rank parts deterministically.
            if env.rank:
                data_rng = np.random.default_rng([cfg.seed, env.rank, start])
                noise_gen.manual_seed(cfg.seed * 1000 + env.rank + start)
    net = model
    if env.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    if cfg.compile:
        cpu_kernel()  # (kernels loaded, or found missing, before tracing: a build cannot happen inside a trace)
        attention_kernel()
        net = torch.compile(net)

    timed = cfg.time_budget_s is not None
    data = ClipDataset((cfg.data_dir, *cfg.extra_data_dirs),
                       cfg.stage_clip_lens[cfg.stage_at_progress(cfg.progress(start, elapsed_before))],
                       seed=cfg.seed, cache_size=10**6, reward_clip_prob=cfg.reward_clip_prob,
                       effective_actions=cfg.open_loop_drop_blocked, blocked_clip_prob=cfg.blocked_clip_prob)
    if timed:
        data.preload()
    val = load_validation_set(cfg) if env.main else None
    metrics_log = val_log = writer = bar = None
    if env.main:
        metrics_log = CSVLog(cfg.out_dir / "metrics.csv", ["step", "stage", "clip_len", "batch", "loss", "frame_loss",
                                                           "reward_loss", "lr", "grad_norm", "frames_per_s", "elapsed_s"])
        val_log = CSVLog(cfg.out_dir / "val.csv", ["step", "psnr_1step", f"psnr_{cfg.val_horizon}step", "psnr_open_loop_mean",
                                                   "true_action_best", "psnr_between_actions"])
        if cfg.resume:  # rows logged after the checkpoint (or before any checkpoint) are redone
            metrics_log.truncate_after(start)
            val_log.truncate_after(start)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(cfg.out_dir / "tb"), purge_step=start if cfg.resume else None)
        bar = (tqdm(total=round(cfg.time_budget_s), initial=round(elapsed_before), desc="train (s)", unit="s", dynamic_ncols=True)
               if timed else tqdm(total=cfg.total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True))
    meta = {"data_dir": str(cfg.data_dir), "extra_data_dirs": [str(d) for d in cfg.extra_data_dirs],
            "train_config": config_to_json(cfg)}
    amp = torch.autocast(env.device.type, dtype=torch.bfloat16) if cfg.amp else contextlib.nullcontext()

    model.train()
    t_start, frames_seen, t_window = time.perf_counter(), 0, time.perf_counter()
    elapsed = lambda: elapsed_before + time.perf_counter() - t_start  # noqa: E731  training time of the whole run
    comp_cfg = get_compression(cfg.compression)
    step = start
    last = cfg.progress(step, elapsed()) >= 1.0  # a finished run (resumed) trains no further step
    while not last:
        fraction = cfg.progress(step, elapsed())
        stage = cfg.stage_at_progress(fraction) if timed else cfg.stage_at(step)
        clip_len = cfg.stage_clip_lens[stage]
        if data.clip_len != clip_len:
            data.set_clip_len(clip_len)
        batch_size = max(1, cfg.frames_per_step // (clip_len * env.world))
        lr = lr_at(cfg, step, elapsed())
        for group in opt.param_groups:
            group["lr"] = lr

        batch = data.sample_batch(batch_size, data_rng)
        frames = batch["frames"].to(env.device)
        actions = drop_actions(batch["prev_actions"].to(env.device), cfg.action_dropout, model.NULL, model.START,
                               noise_gen)
        rewards = batch["rewards"].to(env.device)
        terminals = batch["terminals"].to(env.device)
        copies, open_loop = cfg.step_objective(step)
        sigma = sample_clip_sigmas(cfg.model, batch_size, clip_len, cfg.long_context, cfg.long_context_prob,
                                   generator=noise_gen, device=env.device, clean_history_prob=cfg.clean_history_prob,
                                   clean_history_noised_frac=cfg.clean_history_noised_frac,
                                   noised_copies=copies)
        compress = None
        if comp_cfg is not None and comp_cfg.dynamic and cfg.compression_prob > 0:
            compress = clip_compression(comp_cfg, frames, cfg.model.pixels_per_token, cfg.compression_prob, noise_gen)
        history = targets = None
        if open_loop:  # the copies read the model's own imagination after a real context
            taken = None
            if cfg.open_loop_drop_blocked:  # the imagined agent stops where the real one did (dropped actions kept)
                taken = torch.where(actions == model.NULL, actions, batch["effective_actions"].to(env.device))
            with amp:
                history = open_loop_history(net, frames, actions, min(cfg.open_loop_context, clip_len - 1),
                                            generator=noise_gen, imagine_actions=taken)
                targets = still_targets(net, frames, history) if cfg.open_loop_still_targets else None
        weights = object_loss_weights(cfg.model, frames, cfg.object_loss_weight) if cfg.object_loss_weight else None
        chunks = temporal_chunks(clip_len, cfg.tbptt_frames)
        state = model.init_state(batch_size, env.device) if len(chunks) > 1 else None
        stats_sum: dict[str, float] = {}
        for i, (s, e) in enumerate(chunks):
            sync = contextlib.nullcontext() if (env.world == 1 or i == len(chunks) - 1) else net.no_sync()
            with sync:
                with amp:
                    loss, stats, state = diffusion_forcing_loss(
                        net, frames[:, s:e], actions[:, s:e], rewards=rewards[:, s:e], terminals=terminals[:, s:e], sigma=sigma[:, s:e],
                        state=state, generator=noise_gen, return_state=True, reward_weight=cfg.reward_loss_weight,
                        compress=None if compress is None else compress[s:e], noised_copies=copies,
                        history=None if history is None else history[:, s:e],
                        copy_targets=None if targets is None else targets[:, s:e],
                        space_weight=None if weights is None else weights[:, s:e],
                        history_reward_weight=cfg.open_loop_reward_weight)
                (loss * (e - s) / clip_len).backward()
            state = state.detach() if state is not None else None
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + v * (e - s) / clip_len
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model, step)
        frames_seen += batch_size * clip_len * env.world
        done = step = step + 1
        last = cfg.progress(step, elapsed()) >= 1.0
        if timed and env.world > 1:  # every process stops at the same step: rank 0's clock decides
            flag = torch.tensor([float(last)], device=env.device)
            dist.broadcast(flag, 0)
            last = bool(flag.item())

        if not env.main:
            if done % cfg.ckpt_every == 0 or last:
                env.barrier()
            continue
        bar.update(round(elapsed()) - bar.n if timed else 1)
        if done % cfg.log_every == 0 or last:
            now = time.perf_counter()
            fps = frames_seen / max(now - t_window, 1e-9)
            frames_seen, t_window = 0, now
            row = {"step": done, "stage": stage, "clip_len": clip_len, "batch": batch_size * env.world,
                   "loss": round(stats_sum.get("loss", 0.0), 5), "frame_loss": round(stats_sum.get("frame_loss", 0.0), 5),
                   "reward_loss": round(stats_sum.get("reward_loss", 0.0), 6), "lr": f"{lr:.3e}",
                   "grad_norm": round(grad_norm, 4), "frames_per_s": round(fps, 1), "elapsed_s": round(elapsed(), 1)}
            metrics_log.write(row)
            for k in ("loss", "frame_loss", "reward_loss", "grad_norm", "frames_per_s"):
                writer.add_scalar(f"train/{k}", float(row[k]), done)
            writer.add_scalar("train/clip_len", clip_len, done)
            bar.set_postfix(loss=f"{row['loss']:.4f}", L=clip_len, fps=f"{fps:.0f}")
        if val is not None and (done % cfg.val_every == 0 or last):
            ema_model = WorldModel(cfg.model).to(env.device)
            ema_model.load_state_dict(ema.shadow)
            video = cfg.sample_every > 0 and (done % cfg.sample_every == 0 or last)
            m = validate(cfg, ema_model, val, done, cfg.out_dir, video)
            val_log.write({"step": done, "psnr_1step": round(m["psnr_1step"], 3),
                           f"psnr_{cfg.val_horizon}step": round(m["psnr_open_loop_last"], 3),
                           "psnr_open_loop_mean": round(m["psnr_open_loop_mean"], 3),
                           "true_action_best": round(m["true_action_best"], 3),
                           "psnr_between_actions": round(m["psnr_between_actions"], 2)})
            writer.add_scalar("val/psnr_1step", m["psnr_1step"], done)
            writer.add_scalar(f"val/psnr_{cfg.val_horizon}step", m["psnr_open_loop_last"], done)
            writer.add_scalar("val/true_action_best", m["true_action_best"], done)
            bar.write(f"step {done}: val PSNR 1-step {m['psnr_1step']:.2f} dB, "
                      f"{cfg.val_horizon}-step {m['psnr_open_loop_last']:.2f} dB, "
                      f"taken action's frame closest {m['true_action_best']:.0%}")
        if done % cfg.ckpt_every == 0 or last:
            save_checkpoint(cfg.out_dir, done, model, ema, opt, data_rng, noise_gen, meta, cfg.keep_checkpoints, elapsed())
            env.barrier()
        if done % cfg.log_every == 0:
            t_window = time.perf_counter()  # frames/s counts training only, not validation or saving

    if env.main:
        bar.close()
        writer.close()
        final = cfg.out_dir / "model"
        model_for_save = WorldModel(cfg.model)
        save_model(final, model_for_save, meta={**meta, "step": step, "train_seconds": round(elapsed(), 1), "weights": "ema"},
                   state_dict=ema.shadow)
    env.barrier()
    env.close()
    return cfg.out_dir / "model"
