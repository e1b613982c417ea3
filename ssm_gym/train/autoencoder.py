"""Training the frame autoencoder (the world model's optional latent space, model/autoencoder.py).

Random single frames from the training episodes; loss: mean squared plus absolute pixel error
(the absolute term keeps thin edges, the border's target colour and the balls, sharp). The
decoder is trained on latents with a little Gaussian noise added, because at inference it decodes
the world model's denoised latents, which are never exactly an encoder output. At the end (and at
every checkpoint) ``latent_scale`` is set so that latents of training frames have standard
deviation ``sigma_data`` (0.5), what the world model's EDM preconditioning assumes.

Run folder: ``metrics.csv``, ``checkpoints/step_*`` (weights, optimizer, RNG: ``--resume``
continues a killed run), ``model/`` (the final autoencoder; ``load_autoencoder``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ssm_gym.maze.dataset import ClipDataset
from ssm_gym.model.autoencoder import FrameAutoencoder
from ssm_gym.model.checkpoint import CheckpointError, load_autoencoder, save_autoencoder
from ssm_gym.model.diffusion import float_to_frames, frames_to_float


@dataclass
class AutoencoderTrainConfig:
    data_dir: Path = Path("data/maze")
    """Folder of training episodes (python -m training.collect)."""
    val_dir: Optional[Path] = Path("data/maze-val")
    """Held-out episodes for the reconstruction PSNR (None: skip)."""
    out_dir: Path = Path("runs/autoencoder")
    latent_channels: int = 8
    downsample: int = 4
    """Latent grid = frame size / downsample (a power of 2)."""
    width: int = 16
    """Channels at full resolution, doubling at each halving."""
    batch_size: int = 64
    steps: int = 8000
    time_budget_s: Optional[float] = None
    """Stop after this much wall time instead (the schedule follows the elapsed fraction)."""
    lr: float = 2e-3
    warmup_steps: int = 100
    latent_noise: float = 0.1
    """Std of the noise added to the latents the decoder is trained on, relative to the latents' std."""
    sigma_data: float = 0.5
    amp: bool = True
    """bf16 autocast (several times faster on CPUs with AVX-512 BF16)."""
    threads: Optional[int] = None
    device: str = "cpu"
    """Where to train ("cpu", "cuda", "cuda:1"); checkpoints are device-free."""
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    val_frames: int = 512
    resume: bool = False

    def validate(self) -> None:
        for name in ("latent_channels", "width", "batch_size", "steps", "log_every", "ckpt_every", "val_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError(f"time_budget_s must be > 0, got {self.time_budget_s}")
        FrameAutoencoder(latent_channels=self.latent_channels, downsample=self.downsample, width=self.width)
        device = torch.device(self.device)  # (a bad name raises here, before the run folder exists)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: CUDA is not available on this machine")


def _to_json(cfg: AutoencoderTrainConfig) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


@torch.no_grad()
def set_latent_scale(ae: FrameAutoencoder, frames: torch.Tensor, sigma_data: float) -> float:
    """Scale latents to std ``sigma_data`` over ``frames`` (N, H, W, C) uint8; returns the scale."""
    ae.latent_scale.fill_(1.0)
    dev = ae.latent_scale.device
    z = torch.cat([ae.encode(frames_to_float(f.to(dev))) for f in frames.split(256)])
    ae.latent_scale.fill_(sigma_data / z.float().std().clamp(min=1e-8).item())
    return float(ae.latent_scale)


@torch.no_grad()
def reconstruction_psnr(ae: FrameAutoencoder, frames: torch.Tensor) -> float:
    """Mean PSNR (dB) of the autoencoder's uint8 reconstructions of ``frames`` (N, H, W, C) uint8."""
    from ssm_gym.eval.metrics import psnr

    dev = ae.latent_scale.device
    rec = torch.cat([float_to_frames(ae(frames_to_float(f.to(dev)))).cpu() for f in frames.split(256)])
    return float(psnr(rec, frames).mean())


def validation_frames(folder: Path, n: int) -> torch.Tensor:
    """``n`` frames spread over the episodes of ``folder`` (fixed: every run judged on the same)."""
    data = ClipDataset(folder, 1, seed=12345)
    rng = np.random.default_rng(12345)
    return data.sample_batch(n, rng)["frames"][:, 0]


def lr_at(cfg: AutoencoderTrainConfig, step: int, progress: float) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _save_checkpoint(cfg: AutoencoderTrainConfig, ae, opt, rng, step: int, elapsed: float, scale_frames) -> None:
    set_latent_scale(ae, scale_frames, cfg.sigma_data)
    path = cfg.out_dir / "checkpoints" / "latest"
    save_autoencoder(path, ae, meta={"step": step})
    state = {"step": step, "elapsed_s": elapsed, "optimizer": opt.state_dict(), "data_rng": rng.bit_generator.state,
             "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state(ae.latent_scale.device) if ae.latent_scale.is_cuda else None}
    tmp = cfg.out_dir / "checkpoints" / "train_state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, cfg.out_dir / "checkpoints" / "train_state.pt")


def train_autoencoder(cfg: AutoencoderTrainConfig) -> Path:
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    cfg_file = cfg.out_dir / "train_config.json"
    if cfg.resume:
        if not cfg_file.is_file():
            raise FileNotFoundError(f"--resume: {cfg_file} not found; nothing to resume in {cfg.out_dir}")
        before, now = json.loads(cfg_file.read_text()), json.loads(json.dumps(_to_json(cfg)))
        diff = sorted(k for k in set(before) | set(now) if k not in ("resume", "threads", "device") and before.get(k) != now.get(k))
        if diff:
            raise ValueError(f"--resume: config differs from the run in {cfg.out_dir} in {diff}")
    elif cfg_file.exists():
        raise FileExistsError(f"{cfg.out_dir} already holds a run; pass --resume to continue it or choose another --out-dir")
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(json.dumps(_to_json(cfg), indent=2) + "\n")

    data = ClipDataset(cfg.data_dir, 1, seed=cfg.seed)
    data.preload()
    rng = np.random.default_rng(cfg.seed)
    device = torch.device(cfg.device)
    ae = FrameAutoencoder(latent_channels=cfg.latent_channels, downsample=cfg.downsample, width=cfg.width).to(device)
    opt = torch.optim.AdamW(ae.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    scale_frames = data.sample_batch(1024, np.random.default_rng(cfg.seed + 1))["frames"][:, 0]
    val = validation_frames(cfg.val_dir, cfg.val_frames) if cfg.val_dir is not None else None

    step, elapsed = 0, 0.0
    if cfg.resume and (cfg.out_dir / "checkpoints" / "train_state.pt").is_file():
        saved = load_autoencoder(cfg.out_dir / "checkpoints" / "latest")
        ae.load_state_dict(saved.state_dict())
        try:
            state = torch.load(cfg.out_dir / "checkpoints" / "train_state.pt", weights_only=False, map_location=device)
        except Exception as e:  # a damaged file: say so, keep the run folder as it is
            raise CheckpointError(f"{cfg.out_dir / 'checkpoints' / 'train_state.pt'}: corrupt ({e})") from None
        opt.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["data_rng"]
        torch.set_rng_state(state["torch_rng"].cpu())
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        step, elapsed = int(state["step"]), float(state["elapsed_s"])
        print(f"resumed at step {step} ({elapsed:.0f} s trained)")
    ae.latent_scale.fill_(1.0)  # training sees unscaled latents; the scale is set at each save

    log = cfg.out_dir / "metrics.csv"
    if not log.exists() or not cfg.resume:
        log.write_text("step,elapsed_s,loss,val_psnr\n")
    t0 = time.time() - elapsed
    progress = lambda: (time.time() - t0) / cfg.time_budget_s if cfg.time_budget_s else step / cfg.steps  # noqa: E731
    ae.train()
    while progress() < 1.0:
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step, progress())
        x = frames_to_float(data.sample_batch(cfg.batch_size, rng)["frames"][:, 0].to(device))
        with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp):
            z = ae.encode(x)
            z = z + torch.randn_like(z) * (cfg.latent_noise * z.detach().float().std())
            y = ae.decode(z).float()
        loss = (y - x).pow(2).mean() + (y - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % cfg.log_every == 0 or progress() >= 1.0:
            val_psnr = ""
            if val is not None and (step % cfg.ckpt_every == 0 or progress() >= 1.0):
                ae.eval()
                val_psnr = f"{reconstruction_psnr(ae, val):.2f}"
                ae.train()
            with log.open("a") as f:
                f.write(f"{step},{time.time() - t0:.1f},{loss.item():.5f},{val_psnr}\n")
            print(f"step {step} loss {loss.item():.4f} {'val PSNR ' + val_psnr + ' dB' if val_psnr else ''}"
                  f" ({time.time() - t0:.0f} s)", flush=True)
        if step % cfg.ckpt_every == 0:
            _save_checkpoint(cfg, ae, opt, rng, step, time.time() - t0, scale_frames)
            ae.latent_scale.fill_(1.0)
    ae.eval()
    scale = set_latent_scale(ae, scale_frames, cfg.sigma_data)
    meta = {"step": step, "elapsed_s": round(time.time() - t0, 1), "latent_scale": scale,
            "val_psnr": reconstruction_psnr(ae, val) if val is not None else None, "data_dir": str(cfg.data_dir)}
    out = save_autoencoder(cfg.out_dir / "model", ae, meta=meta)
    print(f"autoencoder: {out} (val PSNR {meta['val_psnr']}, latent scale {scale:.4f})")
    return out
