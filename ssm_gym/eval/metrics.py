"""Image metrics from scikit-image (maintained implementations), on uint8 frames."""

from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def _as_uint8(frames) -> np.ndarray:
    a = frames.detach().cpu().numpy() if hasattr(frames, "detach") else np.asarray(frames)
    if a.dtype != np.uint8:
        raise TypeError(f"frames must be uint8, got {a.dtype}")
    return a


def psnr(pred, true) -> np.ndarray:
    """Per-frame PSNR in dB of (..., H, W, 3) uint8 frames (inf-safe: identical frames give 100 dB)."""
    p, t = _as_uint8(pred), _as_uint8(true)
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch: {p.shape} vs {t.shape}")
    p2, t2 = p.reshape(-1, *p.shape[-3:]), t.reshape(-1, *t.shape[-3:])
    out = np.array([100.0 if np.array_equal(a, b) else peak_signal_noise_ratio(b, a, data_range=255) for a, b in zip(p2, t2)])
    return out.reshape(p.shape[:-3])


def ssim(pred, true) -> np.ndarray:
    """Per-frame SSIM of (..., H, W, 3) uint8 frames (channel-averaged, 7x7 window)."""
    p, t = _as_uint8(pred), _as_uint8(true)
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch: {p.shape} vs {t.shape}")
    p2, t2 = p.reshape(-1, *p.shape[-3:]), t.reshape(-1, *t.shape[-3:])
    out = np.array([structural_similarity(b, a, channel_axis=-1, data_range=255) for a, b in zip(p2, t2)])
    return out.reshape(p.shape[:-3])
