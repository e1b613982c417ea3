"""A small convolutional frame autoencoder: the world model's optional latent space.

Why (session 16): every pixel-space model so far stayed a blur. Its 8x8x3 pixel patches (192
values) enter and leave 128-wide tokens, so the denoiser spends its width on pixel detail and
cannot cancel the noise in directions the token does not span (the pixel refiner's reason). The
paper's models denoise the latents of a pretrained autoencoder instead. Here the autoencoder maps
a 64x64x3 frame to a 16x16x8 grid (12x fewer values); with 2x2 latent patches a token carries 32
values, well inside its width. The maze's frames are flat-shaded geometry, so a small network
reconstructs them far better than any world model so far predicts them (measured in the README).

Layout: frames enter and leave channels-last like everywhere in the model ((..., H, W, C), floats
in [-1, 1]); latents are (..., h, w, c), multiplied by ``latent_scale`` (a buffer set after
training, so latents have the standard deviation ``sigma_data`` of EDM's preconditioning).
The autoencoder is trained first (``python -m training.train_autoencoder``) and frozen in the
world model (``WorldModelConfig.latent_channels``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(torch.nn.functional.silu(self.conv1(torch.nn.functional.silu(x))))


def stage_widths(width: int, downsample: int) -> list[int]:
    """Channels at each resolution, full resolution first: doubling per halving."""
    if downsample < 1 or downsample & (downsample - 1):
        raise ValueError(f"latent_downsample must be a power of 2, got {downsample}")
    return [width * 2 ** i for i in range(int(math.log2(downsample)) + 1)]


class FrameAutoencoder(nn.Module):
    """Encoder: a 3x3 conv, then per halving a stride-2 conv and a residual block, then a 1x1 conv
    to ``latent_channels``. Decoder: the mirror image (nearest upsampling + 3x3 conv). No
    normalisation layers: the output must not depend on what else is in the batch."""

    def __init__(self, channels: int = 3, latent_channels: int = 8, downsample: int = 4, width: int = 16):
        super().__init__()
        self.channels, self.latent_channels, self.downsample, self.width = channels, latent_channels, downsample, width
        w = stage_widths(width, downsample)
        enc: list[nn.Module] = [nn.Conv2d(channels, w[0], 3, padding=1)]
        for a, b in zip(w[:-1], w[1:]):
            enc += [nn.SiLU(), nn.Conv2d(a, b, 4, stride=2, padding=1), ResBlock(b)]
        enc += [nn.SiLU(), nn.Conv2d(w[-1], latent_channels, 1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(latent_channels, w[-1], 3, padding=1), ResBlock(w[-1])]
        for a, b in zip(w[:0:-1], w[-2::-1]):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(a, b, 3, padding=1), ResBlock(b)]
        dec += [nn.SiLU(), nn.Conv2d(w[0], channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        # multiplies the encoder's output so that latents have std sigma_data (set after training)
        self.register_buffer("latent_scale", torch.ones(()), persistent=True)

    @property
    def fields(self) -> dict[str, int]:
        """The constructor's arguments (what a checkpoint stores, and a world model's config must match)."""
        return {"channels": self.channels, "latent_channels": self.latent_channels, "downsample": self.downsample,
                "width": self.width}

    def _check(self, x: Tensor, c: int, what: str) -> None:
        if x.dim() < 4 or x.shape[-1] != c or x.shape[-2] != x.shape[-3] or x.shape[-2] % (
                self.downsample if what == "frames" else 1):
            raise ValueError(f"{what} must be (..., H, W, {c}) with H = W"
                             + (f" divisible by {self.downsample}" if what == "frames" else "")
                             + f", got {tuple(x.shape)}")

    def encode(self, frames: Tensor) -> Tensor:
        """(..., H, W, C) floats in [-1, 1] -> (..., H/d, W/d, latent_channels) scaled latents."""
        self._check(frames, self.channels, "frames")
        lead = frames.shape[:-3]
        z = self.encoder(frames.reshape(-1, *frames.shape[-3:]).permute(0, 3, 1, 2))
        z = z.permute(0, 2, 3, 1) * self.latent_scale.to(z.dtype)
        return z.reshape(*lead, *z.shape[1:])

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents (..., h, w, latent_channels) -> frames (..., h*d, w*d, C), floats (not clamped)."""
        self._check(z, self.latent_channels, "latents")
        lead = z.shape[:-3]
        z = z.reshape(-1, *z.shape[-3:]) / self.latent_scale.to(z.dtype)
        x = self.decoder(z.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x.reshape(*lead, *x.shape[1:])

    def forward(self, frames: Tensor) -> Tensor:
        return self.decode(self.encode(frames))
