"""Diffusion forcing objective and the few-step sampler (EDM parameterisation).

Parameterisation (Karras et al. 2022, "EDM", as used by DIAMOND for Atari world models):
a noisy frame is ``x = x0 + sigma * eps`` with frames scaled to [-1, 1]; the network F sees
``c_in(sigma) * x`` and the noise level ``c_noise(sigma)``, and the denoiser is
``D(x; sigma) = c_skip(sigma) * x + c_out(sigma) * F``. Why EDM: the preconditioning keeps the
network's input and target at unit variance at every noise level, so the same net works for
clean context frames (sigma = 0 gives ``D = x`` exactly, with a distinct noise embedding) and
for pure noise; and a deterministic Euler sampler gives usable frames in very few steps
(DIAMOND: 3), with a 1-step mode that returns the network's direct x0 estimate.

Diffusion forcing (Chen et al. 2024): every frame of a clip gets its own independent noise
level; the causal network denoises all frames at once. Long-context training (Po et al. 2025):
with probability 0.5 a clean prefix longer than half of the clip is kept noise-free and the
frame loss covers the noised frames only, which forces use of distant context.

Noised copies (``noised_copies=True``, our addition): the clip runs clean, and a noised copy of
every frame is denoised from the clean history before it (``WorldModel.forward_paired``), as
DIAMOND conditions its denoiser on clean past frames. Every frame then carries a loss, from the
history it has at inference, for about twice the compute of one pass; with diffusion forcing and
a clean history (``clean_history_prob``) three quarters of the frames are clean context with no loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def frames_to_float(frames: Tensor) -> Tensor:
    """uint8 frames -> float in [-1, 1] (floats are passed through)."""
    return frames.float().div(127.5).sub(1.0) if frames.dtype == torch.uint8 else frames


def float_to_frames(x: Tensor) -> Tensor:
    """float in [-1, 1] -> uint8 frames."""
    return x.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def edm_scalings(sigma: Tensor, sigma_data: float):
    """c_skip, c_out, c_in, c_noise for noise levels ``sigma`` (any shape). sigma = 0 is allowed
    (clean context frame): c_skip = 1, c_out = 0, and c_noise a distinct value below every
    training level."""
    s2, d2 = sigma * sigma, sigma_data * sigma_data
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / (s2 + d2).sqrt()
    c_in = 1.0 / (s2 + d2).sqrt()
    c_noise = sigma.clamp(min=1e-4).log() / 4.0
    return c_skip, c_out, c_in, c_noise


def sample_train_sigmas(shape, p_mean: float, p_std: float, generator=None, device=None) -> Tensor:
    """EDM's log-normal training noise levels, independent per frame (diffusion forcing)."""
    return (torch.randn(shape, generator=generator, device=device) * p_std + p_mean).exp()


def long_context_prefix(batch: int, length: int, prob: float = 0.5, generator=None, device=None) -> Tensor:
    """Per sample, the number of leading frames kept clean: with probability ``prob`` a length
    drawn uniformly in (length/2, length-1] (at least one noised frame remains), else 0."""
    lo = length // 2 + 1
    if length < 2 or lo > length - 1:
        return torch.zeros(batch, dtype=torch.long, device=device)
    use = torch.rand(batch, generator=generator, device=device) < prob
    n = torch.randint(lo, length, (batch,), generator=generator, device=device)
    return torch.where(use, n, torch.zeros_like(n))


def diffusion_forcing_loss(
    model,
    frames: Tensor,
    actions: Tensor,
    rewards: Tensor | None = None,
    terminals: Tensor | None = None,
    valid: Tensor | None = None,
    long_context: bool = True,
    long_context_prob: float = 0.5,
    generator: torch.Generator | None = None,
    state=None,
    sigma: Tensor | None = None,
    return_state: bool = False,
    compress=None,
    reward_weight: float = 1.0,
    noised_copies: bool = False,
    history: Tensor | None = None,
    copy_targets: Tensor | None = None,
    space_weight: Tensor | None = None,
    history_reward_weight: float = 1.0,
):
    """Training loss for a batch of clips.

    frames (B, T, H, W, C) uint8 or float in [-1, 1]; actions (B, T) long: ``actions[:, t]`` is
    the action that led to frame t (``model.START`` for a first frame); rewards (B, T) float and
    terminals (B, T) bool/float for the transition into frame t (optional); valid (B, T) bool
    masks padding. compress: state-compression masks of these frames (``ClipCompression``).
    reward_weight scales the reward head's loss (``stats`` report it unscaled).
    noised_copies: denoise a noised copy of every frame from the clean frames before it (see the
    module docstring); sigma (drawn if None) must then be > 0 for every frame, and the clean-prefix
    options do not apply (every copy already has a clean history). The reward and termination
    heads are trained on the copies and on the clean frames, half each.
    history (B, T, *space_shape), with noised copies only: the clean frames the copies read instead
    of the clip's own (e.g. the model's open-loop imagination after a real context,
    :func:`open_loop_history`); the copies still denoise towards the real frames, so the model
    learns to predict the real next frame from the history it will have in imagination.
    copy_targets (B, T, *space_shape), with noised copies only: the frames the copies denoise
    towards instead of the clip's own (:func:`still_targets`); the clean stream is unchanged.
    space_weight (B, T, h, w): weights of the positions of the network's space in each frame's
    denoising loss (a weighted mean, so a frame's loss keeps its scale), e.g.
    :func:`object_loss_weights`.
    history_reward_weight, with ``history`` only: weight of the reward loss of the head read on
    the history's frames (its real context and the imagined frames after it, where the env reads
    the head in imagination) next to 1 for the copies': more
    of it teaches the network to carry a coming touch into its imagined features (the head alone,
    refitted on them, recalls few touches past the fourth imagined step; session 31).
    Returns ``(loss, stats)``; ``stats`` holds detached floats.
    """
    net = getattr(model, "module", model)  # (model may be wrapped in DDP)
    cfg = net.config
    x0 = net.to_space(frames)  # the frames, or their latents
    b, t = x0.shape[:2]
    dev = x0.device
    if sigma is None:
        sigma = sample_clip_sigmas(cfg, b, t, long_context, long_context_prob, generator, dev,
                                   noised_copies=noised_copies)
    xt = x0  # what the noised frames are made from and denoised towards
    if copy_targets is not None:
        if not noised_copies:
            raise ValueError("copy_targets are the noised copies' targets: set noised_copies=True")
        if tuple(copy_targets.shape) != tuple(x0.shape):
            raise ValueError(f"copy_targets {tuple(copy_targets.shape)} do not match the clip {tuple(x0.shape)}")
        xt = copy_targets.to(x0.dtype)
    noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
    xn = xt + sigma[:, :, None, None, None] * noise
    update = "copy" if state is not None else "none"
    heads = []
    if noised_copies:
        if compress is not None:
            raise ValueError("noised copies do not support state compression masks")
        if not bool((sigma > 0).all()):
            raise ValueError("with noised copies every frame needs a noise level > 0 (its clean self is the history)")
        if history_reward_weight < 0:
            raise ValueError(f"history_reward_weight must be >= 0, got {history_reward_weight}")
        if history is not None and tuple(history.shape) != tuple(x0.shape):
            raise ValueError(f"history {tuple(history.shape)} does not match the clip {tuple(x0.shape)}")
        out, clean_out = model(xn, sigma, actions, state=state, update=update,
                               clean=x0 if history is None else history.to(x0.dtype), paired=True)
        heads.append(clean_out)
    else:
        if history is not None:
            raise ValueError("a separate history (open-loop training) needs noised copies: plain diffusion forcing "
                             "denoises the history's own frames")
        out = model(xn, sigma, actions, state=state, update=update, compress=compress, clean=x0)
    heads.append(out)

    c_skip, c_out, _, _ = edm_scalings(sigma, cfg.sigma_data)
    noised = sigma > 0
    if valid is not None:
        noised = noised & valid
    cs, co = c_skip[:, :, None, None, None], c_out[:, :, None, None, None].clamp(min=1e-8)
    target = (xt - cs * xn) / co
    err = (out.raw.float() - target).pow(2)
    if space_weight is None:
        per_frame = err.flatten(2).mean(-1)  # (B, T)
    else:
        if tuple(space_weight.shape) != tuple(err.shape[:-1]):
            raise ValueError(f"space_weight {tuple(space_weight.shape)} does not match the clip's space {tuple(err.shape[:-1])}")
        sw = space_weight.float()
        frame_weight = sw.flatten(2).mean(-1)  # (B, T)
        if bool((sw < 0).any()) or not bool((frame_weight > 0).all()):
            raise ValueError("space_weight must be >= 0 with a positive sum in every frame")
        per_frame = (err * sw[..., None]).flatten(2).mean(-1) / frame_weight
    w = noised.float()
    frame_loss = (per_frame * w).sum() / w.sum().clamp(min=1.0)
    loss = frame_loss
    stats = {"frame_loss": frame_loss.detach().item(), "noised_frac": w.mean().item()}
    m = torch.ones(b, t, device=dev) if valid is None else valid.float()
    if rewards is not None:
        per_head = [((o.reward.float() - rewards.float()).pow(2) * m).sum() / m.sum().clamp(min=1.0) for o in heads]
        r_loss = sum(per_head) / len(heads)
        if history is not None and history_reward_weight != 1.0:  # heads[0] read the history
            weighted = (history_reward_weight * per_head[0] + sum(per_head[1:])) / len(heads)
        else:
            weighted = r_loss
        loss = loss + reward_weight * weighted
        stats["reward_loss"] = r_loss.detach().item()
    if terminals is not None:
        t_loss = sum((F.binary_cross_entropy_with_logits(o.term_logit.float(), terminals.float(), reduction="none")
                      * m).sum() for o in heads) / (len(heads) * m.sum().clamp(min=1.0))
        loss = loss + t_loss
        stats["term_loss"] = t_loss.detach().item()
    stats["loss"] = loss.detach().item()
    return (loss, stats, out.state) if return_state else (loss, stats)


@torch.no_grad()
def open_loop_history(model, frames: Tensor, actions: Tensor, context: int, steps: int = 1,
                      generator: torch.Generator | None = None, imagine_actions: Tensor | None = None) -> Tensor:
    """The history an agent's imagination gives a model, for training on it: the first ``context``
    frames of each clip real, the rest the model's own open-loop generation from them under the
    clip's real actions (``steps`` denoising steps), in the network's space (B, T, *space_shape).
    Why: trained only on real histories, a model meets its own slightly wrong frames first at
    inference, and the errors compound into a fog within tens of steps (exposure bias); with this
    history and the real frames as targets it learns to pull a drifting rollout back.
    imagine_actions (B, T): the actions the imagination takes after the context instead of
    ``actions`` (e.g. with the moves a wall cancelled taken out, so that the imagined agent stops
    where the real one did; the context is always observed with ``actions``)."""
    net = getattr(model, "module", model)  # (DDP)
    x0 = net.to_space(frames)
    b, t = x0.shape[:2]
    if not 1 <= context <= t:
        raise ValueError(f"context must be in [1, {t}] for clips of {t} frames, got {context}")
    state = net.init_state(b, x0.device)
    net.observe_clip(state, x0[:, :context], actions[:, :context])
    if imagine_actions is not None and tuple(imagine_actions.shape) != tuple(actions.shape):
        raise ValueError(f"imagine_actions {tuple(imagine_actions.shape)} do not match actions {tuple(actions.shape)}")
    taken = actions if imagine_actions is None else imagine_actions
    imagined = net.imagine(state, taken[:, context:], steps, generator)
    return torch.cat([x0[:, :context], imagined.to(x0.dtype)], 1)


def still_targets(model, frames: Tensor, history: Tensor) -> Tensor:
    """Targets for the noised copies of an open-loop step, in the network's space (B, T, ...): the
    real frame, except where the real clip stood still (frame t equal to frame t-1: a no-op, or a
    move a wall cancelled): there the history's frame t-1. Why: trained to predict the real frame
    from its own drifted imagination, a model changes its frame at every step, even where the
    world did not change (session 24: an imagined agent walks on through walls); where the world
    stood still the right prediction from any history is that history's last frame."""
    net = getattr(model, "module", model)  # (DDP)
    x0 = net.to_space(frames)
    if tuple(history.shape) != tuple(x0.shape):
        raise ValueError(f"history {tuple(history.shape)} does not match the clip {tuple(x0.shape)}")
    still = torch.zeros(frames.shape[:2], dtype=torch.bool, device=frames.device)
    still[:, 1:] = (frames[:, 1:] == frames[:, :-1]).flatten(2).all(-1)
    before = torch.cat([x0[:, :1], history[:, :-1].to(x0.dtype)], 1)
    return torch.where(still.view(*still.shape, *(1,) * (x0.dim() - 2)), before, x0)


def sample_clip_sigmas(cfg, batch: int, length: int, long_context: bool = True, long_context_prob: float = 0.5,
                       generator: torch.Generator | None = None, device=None, clean_history_prob: float = 0.0,
                       clean_history_noised_frac: float = 0.25, noised_copies: bool = False) -> Tensor:
    """(batch, length) training noise levels for whole clips: independent per frame (diffusion
    forcing), with the long-context clean prefix applied. Drawn for the whole clip up front so a
    clip trained in temporal chunks (truncated BPTT) gets the same noise pattern as in one piece.

    clean_history_prob: share of clips in which only a random ``clean_history_noised_frac`` of the
    frames is noised and the rest stay clean. Why: with every frame noised, a predicted frame
    almost never follows a clean one, yet at inference the history is always clean (real or
    generated frames); the step from a clean previous frame through the action is what an agent
    needs, and plain diffusion forcing rarely trains it.

    noised_copies: every frame noised (its clean self is the copy's history), the clean-prefix
    options unused."""
    if not 0.0 <= clean_history_prob <= 1.0:
        raise ValueError(f"clean_history_prob must be in [0, 1], got {clean_history_prob}")
    if not 0.0 < clean_history_noised_frac <= 1.0:
        raise ValueError(f"clean_history_noised_frac must be in (0, 1], got {clean_history_noised_frac}")
    sigma = sample_train_sigmas((batch, length), cfg.p_mean, cfg.p_std, generator, device)
    if noised_copies:
        return sigma
    if clean_history_prob > 0:
        sparse = torch.rand(batch, generator=generator, device=device) < clean_history_prob
        kept = torch.rand((batch, length), generator=generator, device=device) < clean_history_noised_frac
        sigma = torch.where(sparse[:, None] & ~kept, torch.zeros_like(sigma), sigma)
    if long_context:
        prefix = long_context_prefix(batch, length, long_context_prob, generator, device)
        sigma = torch.where(torch.arange(length, device=device)[None] < prefix[:, None], torch.zeros_like(sigma), sigma)
    return sigma


def drop_actions(actions: Tensor, prob: float, null: int, start: int, generator: torch.Generator | None = None) -> Tensor:
    """Each real action (not ``start``, which marks a first frame) replaced by ``null`` with
    probability ``prob``, independently per frame: trains the action-free prediction that
    classifier-free action guidance contrasts with (``WorldModel.generate``)."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"action dropout must be in [0, 1], got {prob}")
    if prob == 0:
        return actions
    drop = torch.rand(actions.shape, generator=generator, device=actions.device) < prob
    return torch.where(drop & (actions != start), torch.full_like(actions, null), actions)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device=None) -> Tensor:
    """Decreasing noise levels sigma_0 = sigma_max > ... > sigma_{steps-1} >= sigma_min, then 0."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if steps == 1:
        s = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        i = torch.arange(steps, dtype=torch.float64) / (steps - 1)
        s = (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float().to(device)


@torch.no_grad()
def sample(denoise: Callable[[Tensor, Tensor], Tensor], shape, steps: int, sigma_min: float, sigma_max: float,
           rho: float = 7.0, generator: torch.Generator | None = None, device=None, dtype=torch.float32,
           noise: Tensor | None = None) -> Tensor:
    """Deterministic Euler sampler (EDM ODE). ``denoise(x, sigma)`` returns the x0 estimate for a
    batch at scalar noise level ``sigma``. All randomness is the initial noise, drawn from
    ``generator``: the same seed gives the same frame. ``steps=1``: one network call, the
    direct x0 estimate from pure noise (fast mode)."""
    # the schedule as host floats (float32 values): no host-device copies or syncs in the loop, so
    # a step can be captured in a CUDA graph (the rollout engine's cuda_graph option)
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho).tolist()
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    elif tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise must have shape {tuple(shape)}, got {tuple(noise.shape)}")
    x = noise.to(device=device, dtype=dtype) * sigmas[0]
    for i in range(steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, torch.full((), s, dtype=torch.float32, device=x.device))
        x = x0 if s_next == 0 else x + (x - x0) / s * (s_next - s)
    return x


def object_loss_weights(cfg, frames: Tensor, weight: float) -> Tensor:
    """(B, T, h, w) weights for ``space_weight``: 1 + ``weight`` at every position of the network's
    space (a pixel, or a latent pixel) that covers a ball (``ssm_gym.maze.render.object_mask``), 1
    elsewhere. Why: the balls are under 1% of the pixels, and a model trained on the plain mean
    loses them within two or three imagined steps (session 27), so an agent in imagination never
    sees the thing it is paid for walking up to. frames (B, T, H, W, C) uint8. The weights follow
    the clip's real frames, also where the noised copies denoise towards other targets
    (``open_loop_still_targets``: there a still frame's ball may sit elsewhere)."""
    from ssm_gym.maze.render import object_mask

    if frames.dtype != torch.uint8:
        raise TypeError(f"object_loss_weights reads uint8 frames, got {frames.dtype}")
    mask = object_mask(frames).float()
    b, t, hh, ww = mask.shape
    h, w = cfg.space_shape[:2]
    if hh % h or ww % w:
        raise ValueError(f"frames of {hh}x{ww} pixels do not tile the network's {h}x{w} space")
    if (hh, ww) != (h, w):  # latent space: a latent pixel is weighted if any pixel it covers shows a ball
        mask = F.max_pool2d(mask.reshape(b * t, 1, hh, ww), (hh // h, ww // w)).reshape(b, t, h, w)
    return 1.0 + weight * mask
