"""World model: parallel == step API for every variant, pieces == whole, attention window,
state helpers, sampler determinism, and a tiny training smoke test."""

import dataclasses

import pytest
import torch

from ssm_gym.model import (
    VARIANTS,
    WorldModel,
    WorldModelConfig,
    diffusion_forcing_loss,
    incoming_actions,
    karras_sigmas,
    open_loop_history,
    still_targets,
)
from ssm_gym.model.diffusion import drop_actions, edm_scalings, float_to_frames, long_context_prefix, sample_clip_sigmas




def tiny_config(variant, **kw):
    base = {"variant": variant, "image_size": 16, "patch_size": 4, "d_model": 32, "n_layers": 3, "n_heads": 2,
            "ssm_headdim": 16, "d_state": 8, "attn_window": 3, "block_sizes": ((2, 2), (1, 2), (4, 4)),
            "ssm_chunk_size": 8}
    base.update(kw)
    return WorldModelConfig(**base)


def variant_model(spec):
    """"full+prev_frame" -> ("full", a randomized tiny model of that variant with that option on)."""
    variant, _, extra = spec.partition("+")
    value = 4 if extra == "pixel_head" else True  # (pixel_head: the refiner's channels)
    if extra == "latent":  # a latent-space model: 16x16x3 frames -> 8x8x4 latents, 2x2 latent patches
        return variant, randomized(tiny_config(variant, latent_channels=4, latent_downsample=2, latent_width=4,
                                               patch_size=2))
    return variant, randomized(tiny_config(variant, **({extra: value} if extra else {})))


def randomized(cfg, seed=0):
    """A model whose zero-initialised (adaLN-Zero, output) weights are made non-zero, so that
    every path carries signal."""
    torch.manual_seed(seed)
    m = WorldModel(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if (p == 0).all():
                p.normal_(0, 0.2)
    return m.eval()


def clip(b=2, t=9, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (b, t, size, size, 3), generator=g, dtype=torch.uint8)
    actions = torch.randint(0, 6, (b, t), generator=g)
    actions[:, 0] = 6
    return frames, actions


def max_err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("variant", [*VARIANTS, "full+action_tokens", "full+prev_frame", "attn_full+prev_frame",
                                     "full+pixel_head", "full+latent"])
def test_parallel_equals_step(variant):
    variant, m = variant_model(variant)
    frames, actions = clip()
    t = frames.shape[1]
    with torch.no_grad():  # (observe skips the pixel refiner: on clean frames its output is scaled by 0)
        par = m(frames, torch.zeros(2, t), actions, refine=False)
    state = m.init_state(2)
    steps = [m.observe(state, frames[:, i], actions[:, i]) for i in range(t)]
    assert max_err(torch.cat([s.raw for s in steps], 1), par.raw) < 1e-4
    assert max_err(torch.cat([s.reward for s in steps], 1), par.reward) < 1e-4
    assert max_err(torch.cat([s.term_logit for s in steps], 1), par.term_logit) < 1e-4
    assert state.t.tolist() == [t, t]
    if variant != "attn_full":  # constant-size state
        fresh = m.init_state(2)
        assert state.nbytes() == fresh.nbytes()
    parts = state.nbytes_by_part()
    assert sum(parts.values()) == state.nbytes() and parts["attention_cache"] > 0
    assert (parts["ssm_state"] > 0) == (variant in ("full", "ssm_flat"))


@pytest.mark.parametrize("variant", [*VARIANTS, "full+prev_frame", "full+pixel_head"])
def test_pieces_with_state_equal_whole(variant):
    variant, m = variant_model(variant)
    frames, actions = clip(t=11)
    g = torch.Generator().manual_seed(1)
    sigma = torch.rand(2, 11, generator=g) * 2
    sigma[:, 3] = 0
    noisy = frames.float() / 127.5 - 1 + sigma[..., None, None, None] * torch.randn(2, 11, 16, 16, 3, generator=g)
    with torch.no_grad():
        whole = m(noisy, sigma, actions, clean=frames)
        state, outs = m.init_state(2), []
        for a, b in [(0, 4), (4, 5), (5, 11)]:
            out = m(noisy[:, a:b], sigma[:, a:b], actions[:, a:b], state=state, update="copy", clean=frames[:, a:b])
            state = out.state
            outs.append(out)
    assert max_err(torch.cat([o.denoised for o in outs], 1), whole.denoised) < 1e-4
    assert max_err(torch.cat([o.reward for o in outs], 1), whole.reward) < 1e-4


@pytest.mark.parametrize("variant", [*VARIANTS, "full+prev_frame", "full+pixel_head", "full+action_tokens",
                                     "full+null_action", "full+latent"])
@pytest.mark.parametrize("with_state", [False, True])
def test_paired_copies_equal_one_frame_steps(variant, with_state):
    """forward_paired: the noised copy of frame t == a one-frame forward of it from the state after
    the clean frames < t; the clean frames' heads and the state after them == forward's."""
    variant, m = variant_model(variant)
    frames, actions = clip(t=8)
    if m.action_null is not None:
        actions[:, 3] = m.NULL
    g = torch.Generator().manual_seed(2)
    sigma = torch.rand(2, 8, generator=g) * 3 + 0.01
    noisy = frames.float() / 127.5 - 1 + sigma[..., None, None, None] * torch.randn(2, 8, 16, 16, 3, generator=g)
    with torch.no_grad():
        start = m.init_state(2)
        if with_state:  # a piece that follows earlier frames (truncated BPTT)
            before, before_actions = clip(t=5, seed=3)
            start = m(before, torch.zeros(2, 5), before_actions, state=start, update="copy").state
        copies, clean_out = m.forward_paired(noisy, sigma, actions, frames, state=start)
        whole = m(frames, torch.zeros(2, 8), actions, state=start, update="copy", refine=False)
        state, singles = start, []
        for t in range(8):
            singles.append(m(noisy[:, t:t + 1], sigma[:, t:t + 1], actions[:, t:t + 1], state=state, update="none"))
            state = m(frames[:, t:t + 1], torch.zeros(2, 1), actions[:, t:t + 1], state=state, update="copy").state
    assert max_err(torch.cat([o.denoised for o in singles], 1), copies.denoised) < 1e-4
    assert max_err(torch.cat([o.reward for o in singles], 1), copies.reward) < 1e-4
    assert max_err(clean_out.reward, whole.reward) < 1e-4 and max_err(clean_out.term_logit, whole.term_logit) < 1e-4
    for a, b in zip(copies.state.ssm, whole.state.ssm):
        for x, y in zip(a or (), b or ()):
            if x is not None and x.numel():
                assert max_err(x, y) < 1e-4
    for a, b in zip(copies.state.kv, whole.state.kv):
        assert max_err(a.k, b.k) < 1e-4 and max_err(a.v, b.v) < 1e-4 and torch.equal(a.pos, b.pos)
    assert copies.state.t.tolist() == whole.state.t.tolist()


def test_paired_gradients_reach_history():
    """The copies' loss trains the clean history's path too (SSM state and attention keys): the
    gradient of a late copy's output with respect to an early clean frame is non-zero, and with
    respect to the other copies zero (a copy changes no state)."""
    _, m = variant_model("full")
    frames, actions = clip(t=6)
    x0 = (frames.float() / 127.5 - 1).requires_grad_()
    sigma = torch.full((2, 6), 1.0)
    noisy = (x0.detach() + torch.randn_like(x0)).requires_grad_()
    copies, _ = m.forward_paired(noisy, sigma, actions, x0)
    copies.raw[:, 5].sum().backward()
    assert x0.grad[:, 0].abs().sum() > 0  # beyond the window of 3: reached through the SSM
    assert noisy.grad[:, :5].abs().sum() == 0 and noisy.grad[:, 5].abs().sum() > 0


def test_paired_rejects_mismatched_clean_frames():
    _, m = variant_model("full")
    frames, actions = clip(t=4)
    with pytest.raises(ValueError, match="do not match"):
        m.forward_paired(frames[:, :3].float(), torch.ones(2, 3), actions[:, :3], frames)


def test_noised_copies_loss_in_pieces_equals_whole():
    """Truncated BPTT with noised copies: the loss over pieces (state carried) equals the loss over
    the whole clip, and every frame carries loss."""
    _, m = variant_model("full+prev_frame")
    frames, actions = clip(t=8)
    sigma = torch.rand(2, 8, generator=torch.Generator().manual_seed(4)) * 2 + 0.05
    rewards = torch.rand(2, 8)

    def loss(a, b, state):
        return diffusion_forcing_loss(m, frames[:, a:b], actions[:, a:b], rewards=rewards[:, a:b], sigma=sigma[:, a:b],
                                      state=state, generator=torch.Generator().manual_seed(a), return_state=True,
                                      noised_copies=True)

    with torch.no_grad():
        whole, stats, _ = loss(0, 8, m.init_state(2))
        first, _, state = loss(0, 3, m.init_state(2))
        second, _, _ = loss(3, 8, state)
    assert stats["noised_frac"] == 1.0
    # (the noise is drawn per call: compare with the whole clip's loss on the same draws)
    noise = torch.cat([torch.randn(frames[:, a:b].shape, generator=torch.Generator().manual_seed(a))
                       for a, b in ((0, 3), (3, 8))], 1)
    x0 = frames.float() / 127.5 - 1
    with torch.no_grad():
        copies, clean_out = m.forward_paired(x0 + sigma[..., None, None, None] * noise, sigma, actions, frames)
    c_skip, c_out, _, _ = edm_scalings(sigma, m.config.sigma_data)
    xn = x0 + sigma[..., None, None, None] * noise
    target = (x0 - c_skip[..., None, None, None] * xn) / c_out[..., None, None, None]
    per_frame = (copies.raw - target).pow(2).flatten(2).mean(-1)
    r = 0.5 * ((copies.reward - rewards).pow(2) + (clean_out.reward - rewards).pow(2))
    expected = per_frame[:, :3].mean() * 3 / 8 + per_frame[:, 3:].mean() * 5 / 8 + r.mean()
    assert abs((first * 3 + second * 5).item() / 8 - expected.item()) < 1e-4
    assert whole.item() > 0
    with pytest.raises(ValueError, match="noise level > 0"):
        diffusion_forcing_loss(m, frames, actions, sigma=torch.zeros(2, 8), noised_copies=True)


@pytest.mark.parametrize("spec", ["full", "full+prev_frame", "full+latent"])
def test_imagine_and_open_loop_history(spec):
    """imagine == T calls of generate (same frames, same state after); open_loop_history = the real
    context, then imagine from it, in the network's space (latents for a latent model)."""
    _, m = variant_model(spec)
    frames, actions = clip(t=7)
    a, b = m.init_state(2), m.init_state(2)
    m.observe_clip(a, frames[:, :3], actions[:, :3]), m.observe_clip(b, frames[:, :3], actions[:, :3])
    seen = m.imagine(a, actions[:, 3:], steps=2, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    made = [m.generate(b, actions[:, i], steps=2, generator=g)[0] for i in range(3, 7)]
    assert seen.shape == (2, 4, *m.config.space_shape)
    assert torch.equal(m.to_frames(seen), torch.stack(made, 1))
    assert torch.equal(a.t, b.t)  # and the states behave alike:
    out_a = m(frames[:, :1], torch.zeros(2, 1), actions[:, :1], state=a, update="none")
    out_b = m(frames[:, :1], torch.zeros(2, 1), actions[:, :1], state=b, update="none")
    assert torch.equal(out_a.denoised, out_b.denoised)

    hist = open_loop_history(m, frames, actions, context=3, steps=2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(hist[:, :3], m.to_space(frames[:, :3])) and torch.equal(hist[:, 3:], seen)
    with pytest.raises(ValueError, match="context"):
        open_loop_history(m, frames, actions, context=0)
    # imagine_actions: the imagination after the context takes them; the context keeps the real ones
    taken = actions.clone()
    taken[:, 3:] = 0  # e.g. every move after the context cancelled by a wall
    c = m.init_state(2)
    m.observe_clip(c, frames[:, :3], actions[:, :3])
    stayed = m.imagine(c, taken[:, 3:], steps=2, generator=torch.Generator().manual_seed(5))
    hist = open_loop_history(m, frames, actions, context=3, steps=2, generator=torch.Generator().manual_seed(5),
                             imagine_actions=taken)
    assert torch.equal(hist[:, :3], m.to_space(frames[:, :3])) and torch.equal(hist[:, 3:], stayed)
    assert not torch.equal(stayed, seen)
    with pytest.raises(ValueError, match="imagine_actions"):
        open_loop_history(m, frames, actions, context=3, imagine_actions=taken[:, 1:])


def test_loss_with_open_loop_history():
    """The copies read the given history and still denoise towards the clip: a history equal to
    the clip gives the plain copies loss; another history another loss; bad uses are refused."""
    _, m = variant_model("full+prev_frame")
    frames, actions = clip(t=6)
    sigma = torch.rand(2, 6, generator=torch.Generator().manual_seed(4)) + 0.05

    def loss(**kw):
        return diffusion_forcing_loss(m, frames, actions, sigma=sigma, generator=torch.Generator().manual_seed(1),
                                      noised_copies=True, **kw)[0]

    with torch.no_grad():
        own = m.to_space(frames)
        assert loss(history=own).item() == pytest.approx(loss().item(), rel=1e-6)
        hist = open_loop_history(m, frames, actions, context=2, generator=torch.Generator().manual_seed(2))
        assert abs(loss(history=hist).item() - loss().item()) > 1e-4
        with pytest.raises(ValueError, match="does not match"):
            loss(history=own[:, :5])
        with pytest.raises(ValueError, match="needs noised copies"):
            diffusion_forcing_loss(m, frames, actions, history=own)
        # copy_targets: the clip's own frames as targets give the plain loss, other targets another
        assert loss(history=hist, copy_targets=own).item() == pytest.approx(loss(history=hist).item(), rel=1e-6)
        assert abs(loss(history=hist, copy_targets=hist).item() - loss(history=hist).item()) > 1e-4
        with pytest.raises(ValueError, match="copy_targets"):
            loss(copy_targets=own[:, :5])
        with pytest.raises(ValueError, match="noised_copies"):
            diffusion_forcing_loss(m, frames, actions, copy_targets=own)


def test_history_reward_weight_scales_the_history_head_alone():
    """history_reward_weight w scales the reward loss of the head read on the history: the loss is
    linear in w with a positive slope, the reported reward loss does not change, and without a
    history it does nothing."""
    _, m = variant_model("full")
    frames, actions = clip(t=6)
    sigma = torch.rand(2, 6, generator=torch.Generator().manual_seed(4)) + 0.05
    rewards = torch.zeros(2, 6)
    rewards[0, 4] = 1.0

    def loss(w, **kw):
        return diffusion_forcing_loss(m, frames, actions, rewards=rewards, sigma=sigma, noised_copies=True,
                                      generator=torch.Generator().manual_seed(1), history_reward_weight=w, **kw)

    with torch.no_grad():
        hist = open_loop_history(m, frames, actions, context=2, generator=torch.Generator().manual_seed(2))
        (l1, s1), (l2, s2), (l3, s3) = (loss(w, history=hist) for w in (1.0, 2.0, 3.0))
        assert l2.item() > l1.item() and (l3 - l1).item() == pytest.approx(2 * (l2 - l1).item(), rel=1e-4)
        assert s1["reward_loss"] == s2["reward_loss"] == s3["reward_loss"]
        # the slope is half the reward loss of the head read on the history (the clean stream:
        # the history's frames at noise 0), not the copies' (2 heads)
        clean = m(hist, torch.zeros(2, 6), actions).reward
        assert (l2 - l1).item() == pytest.approx(((clean - rewards) ** 2).mean().item() / 2, rel=1e-3)
        assert loss(5.0)[0].item() == loss(1.0)[0].item()
        with pytest.raises(ValueError, match="history_reward_weight"):
            loss(-1.0, history=hist)


@pytest.mark.parametrize("spec", ["full", "full+latent"])
def test_still_targets(spec):
    """Where the real clip stood still (frame t == frame t-1) the copies' target is the history's
    frame t-1; everywhere else the real frame."""
    _, m = variant_model(spec)
    frames, actions = clip(t=7)
    frames[0, 4] = frames[0, 3]  # clip 0 stands still at frames 4 and 5 (inside the imagined part)
    frames[0, 5] = frames[0, 3]
    frames[1, 1] = frames[1, 0]  # clip 1 at frame 1 (inside the real context)
    hist = open_loop_history(m, frames, actions, context=3, generator=torch.Generator().manual_seed(2))
    targets, own = still_targets(m, frames, hist), m.to_space(frames)
    for b in range(2):
        for t in range(7):
            still = (b, t) in {(0, 4), (0, 5), (1, 1)}
            assert torch.equal(targets[b, t], hist[b, t - 1] if still else own[b, t]), (b, t)
    assert not torch.equal(hist[0, 3], own[0, 4])  # (the imagined frame differs from the real one)
    with pytest.raises(ValueError, match="history"):
        still_targets(m, frames, hist[:, :6])


def test_observe_clip_equals_observe():
    m = randomized(tiny_config("full"))
    frames, actions = clip(t=6)
    s1, s2 = m.init_state(2), m.init_state(2)
    m.observe_clip(s1, frames[:, :4], actions[:, :4])
    for i in range(4):
        m.observe(s2, frames[:, i], actions[:, i])
    o1, o2 = m.observe(s1, frames[:, 4], actions[:, 4]), m.observe(s2, frames[:, 4], actions[:, 4])
    assert max_err(o1.raw, o2.raw) < 1e-4


def _last_frame_output(m, frames, actions):
    with torch.no_grad():
        return m(frames, torch.zeros(frames.shape[:2]), actions).raw[:, -1]


@pytest.mark.parametrize("variant", VARIANTS)
def test_attention_window_respected(variant):
    """attn_local: the last frame does not depend on frames older than the receptive field
    (n_layers * (k-1) + 1 frames; k for one layer); SSM variants and attn_full do."""
    cfg = tiny_config(variant, n_layers=2, attn_window=3)
    m = randomized(cfg)
    t = 12
    frames, actions = clip(b=1, t=t)
    ref = _last_frame_output(m, frames, actions)
    rf = cfg.n_layers * (cfg.attn_window - 1) + 1  # 5 frames
    changed = frames.clone()
    changed[:, : t - rf] = 255 - changed[:, : t - rf]  # every frame older than the receptive field
    out = _last_frame_output(m, changed, actions)
    if variant == "attn_local":
        assert m.receptive_field == rf
        assert torch.equal(out, ref)
        inside = frames.clone()
        inside[:, t - rf] = 255 - inside[:, t - rf]
        assert not torch.allclose(_last_frame_output(m, inside, actions), ref)
    else:
        assert m.receptive_field is None
        assert not torch.allclose(out, ref, atol=1e-6)


def test_single_layer_attention_window_is_k():
    cfg = tiny_config("attn_local", n_layers=1, attn_window=4)
    m = randomized(cfg)
    frames, actions = clip(b=1, t=10)
    ref = _last_frame_output(m, frames, actions)
    changed = frames.clone()
    changed[:, :6] = 0  # frames 0..5, older than frames 6..9
    assert torch.equal(_last_frame_output(m, changed, actions), ref)


@pytest.mark.parametrize("prev_frame", [False, True])
def test_state_helpers_fork_and_reset(prev_frame):
    m = randomized(tiny_config("full", prev_frame=prev_frame))
    frames, actions = clip(b=3, t=5)
    state = m.init_state(3)
    m.observe_clip(state, frames, actions)
    idx = torch.tensor([2, 2, 0])
    fork = state.index_select(idx)
    o_fork = m.observe(fork, frames[idx, 0], actions[idx, 1])
    o_orig = m.observe(state.clone(), frames[:, 0], actions[:, 1])
    assert max_err(o_fork.raw[0], o_orig.raw[2]) < 1e-6 and max_err(o_fork.raw[2], o_orig.raw[0]) < 1e-6
    # reset env 1 only: it then behaves exactly like a fresh env
    state.reset_(torch.tensor([False, True, False]))
    assert state.t.tolist() == [5, 0, 5]
    o_reset = m.observe(state, frames[:, 0], actions[:, 0])
    o_fresh = m.observe(m.init_state(3), frames[:, 0], actions[:, 0])
    assert max_err(o_reset.raw[1], o_fresh.raw[1]) < 1e-5
    assert max_err(o_reset.raw[0], o_fresh.raw[0]) > 1e-4


@pytest.mark.parametrize("variant", ["full", "attn_full", "full+prev_frame"])
def test_generate_deterministic_under_seed(variant):
    variant, m = variant_model(variant)
    frames, actions = clip(t=4)
    base = m.init_state(2)
    m.observe_clip(base, frames, actions)
    results = []
    for seed in (0, 0, 1):
        state = base.clone()
        f, r, term = m.generate(state, torch.tensor([1, 3]), steps=3, generator=torch.Generator().manual_seed(seed))
        assert f.shape == (2, 16, 16, 3) and f.dtype == torch.uint8 and r.shape == (2,) and term.dtype == torch.bool
        assert state.t.tolist() == [5, 5]
        results.append((f, r, state))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert not torch.equal(results[0][0], results[2][0])
    # generate advanced the state exactly as observing the generated frame would
    check = base.clone()
    m.observe(check, results[0][0], torch.tensor([1, 3]))
    o1 = m.observe(check, frames[:, 0], actions[:, 1])
    o2 = m.observe(results[0][2], frames[:, 0], actions[:, 1])
    assert max_err(o1.raw, o2.raw) < 1e-5
    f1, _, _ = m.generate(base.clone(), 2, steps=1, generator=torch.Generator().manual_seed(0))  # fast mode
    assert f1.shape == (2, 16, 16, 3)


def test_action_tokens_depend_on_action_and_position():
    m = randomized(tiny_config("full", action_tokens=True))
    frames, actions = clip()
    sigma = torch.full(actions.shape, 1.0)
    with torch.no_grad():
        out = m(frames, sigma, actions).raw
        m.action_tok.weight[actions[0, 3]].view(m.n_tok, -1)[5] += torch.randn(m.config.d_model)  # one action, one position
        moved = m(frames, sigma, actions).raw
    assert max_err(out[0, 3], moved[0, 3]) > 1e-3  # the frame that action led to changes
    other = (actions[0, :3] != actions[0, 3]).nonzero().flatten()
    assert max_err(out[0, other], moved[0, other]) == 0  # earlier frames cannot see it (causal)


def test_prev_frame_input_is_the_previous_clean_frame():
    """A prev_frame model feeds frame t the clean frame t-1 (not its noised input); the first frame
    of an episode gets none; a noised clip without its clean frames is refused."""
    m = randomized(tiny_config("full", prev_frame=True))
    frames, actions = clip(b=1, t=5)
    sigma = torch.full((1, 5), 1.0)
    noisy = frames.float() / 127.5 - 1 + torch.randn(1, 5, 16, 16, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = m(noisy, sigma, actions, clean=frames).raw
        changed = frames.clone()
        changed[:, 2] = 255 - changed[:, 2]
        out = m(noisy, sigma, actions, clean=changed).raw
        assert max_err(out[:, :3], ref[:, :3]) == 0  # frames up to 2 never see the clean frame 2
        assert max_err(out[:, 3], ref[:, 3]) > 1e-3  # frame 3 does
        m.prev_in.weight.add_(1.0)
        first = m(noisy, sigma, actions, clean=frames).raw[:, 0]
        assert max_err(first, ref[:, 0]) == 0  # the first frame has no previous frame
    with pytest.raises(ValueError, match="clean frames"):
        m(noisy, sigma, actions)
    with pytest.raises(ValueError, match="do not match"):
        m(noisy, sigma, actions, clean=frames[:, :4])
    # a state made for a model without the input is refused, not read as a black frame
    plain = randomized(tiny_config("full"))
    with pytest.raises(ValueError, match="no previous frame"):
        m.observe(plain.init_state(1), frames[:, 0], actions[:, 0])
    assert "previous_frame" in m.init_state(1).nbytes_by_part()


def test_null_action_and_action_guidance():
    """The null action is its own learned embedding; guidance w mixes the passes with and without
    the action as D(null) + w (D(a) - D(null)); w = 1 is plain sampling; the step API still
    equals the parallel form with null actions in the clip; misuse is a clear error."""
    m = randomized(tiny_config("full", null_action=True, action_tokens=True))
    frames, actions = clip(b=2, t=6)
    actions[0, 2] = actions[1, 4] = m.NULL
    with torch.no_grad():
        par = m(frames, torch.zeros(2, 6), actions)
        state = m.init_state(2)
        steps = torch.cat([m.observe(state, frames[:, i], actions[:, i]).raw for i in range(6)], 1)
        assert max_err(steps, par.raw) < 1e-4
        # NULL reads action_null (and no per-position action token): make it look like action 2
        m.action_null.copy_(m.action_emb.weight[2])
        as_two = actions.masked_fill(actions == m.NULL, 2)
        m.action_tok.weight[2].zero_()
        assert max_err(m(frames, torch.zeros(2, 6), actions).raw, m(frames, torch.zeros(2, 6), as_two).raw) == 0
    m = randomized(tiny_config("full", null_action=True))
    state = m.init_state(2)
    m.observe_clip(state, frames[:, :4], actions[:, :4].clamp(max=m.START))
    noise = torch.randn(2, 1, 16, 16, 3, generator=torch.Generator().manual_seed(3))
    a = torch.tensor([1, 4])
    gen = lambda act, **kw: m.generate(state.clone(), act, steps=1, noise=noise, **kw)[0]  # noqa: E731
    assert torch.equal(gen(a, action_guidance=1.0), gen(a))
    assert torch.equal(gen(a, action_guidance=0.0), gen(torch.full_like(a, m.NULL)))  # w = 0: action-free
    with torch.no_grad():  # w = 2 by hand: one denoising pass from pure noise at sigma_max
        x = noise * m.config.sigma_max
        s = torch.full((2, 1), m.config.sigma_max)
        with_a = m(x, s, a[:, None], state=state, update="none").denoised
        free = m(x, s, torch.full((2, 1), m.NULL), state=state, update="none").denoised
    guided = gen(a, action_guidance=2.0)
    assert (guided.int() - float_to_frames(free + 2 * (with_a - free))[:, 0].int()).abs().max() <= 1
    assert not torch.equal(guided, gen(a))
    m.config.action_guidance = 2.0  # the config's default is what generate uses when not told
    assert torch.equal(gen(a), guided)
    m.config.action_guidance = 1.0
    with pytest.raises(ValueError, match="finite"):
        gen(a, action_guidance=float("nan"))
    plain = randomized(tiny_config("full"))
    with pytest.raises(ValueError, match="null action"):
        plain.generate(plain.init_state(2), a, steps=1, action_guidance=2.0)


def test_action_dropout():
    g = torch.Generator().manual_seed(0)
    actions = torch.randint(0, 6, (200, 50), generator=g)
    actions[:, 0] = 6  # START marks first frames: never dropped
    assert torch.equal(drop_actions(actions, 0.0, 7, 6, g), actions)
    dropped = drop_actions(actions, 0.2, 7, 6, g)
    assert (dropped[:, 0] == 6).all()
    changed = dropped != actions
    assert (dropped[changed] == 7).all() and 0.18 < changed[:, 1:].float().mean() < 0.22
    with pytest.raises(ValueError, match="action dropout"):
        drop_actions(actions, 1.5, 7, 6, g)


def test_sampler_sigmas_and_helpers():
    s = karras_sigmas(3, 2e-3, 5.0)
    assert s.shape == (4,) and s[0] == 5.0 and s[-1] == 0 and torch.all(s[:-1] > s[1:])
    assert karras_sigmas(1, 2e-3, 5.0).tolist() == [5.0, 0.0]
    ca = torch.tensor([[1, 2, 3]])
    assert incoming_actions(ca, 6).tolist() == [[6, 1, 2, 3]]
    g = torch.Generator().manual_seed(0)
    p = long_context_prefix(4000, 16, 0.5, g)
    used = p > 0
    assert 0.45 < used.float().mean() < 0.55
    assert p[used].min() >= 9 and p[used].max() <= 15  # longer than half, >= 1 noised frame left


def test_clean_history_noise_pattern():
    cfg = WorldModelConfig()
    g = torch.Generator().manual_seed(0)
    # off: the exact draws of plain diffusion forcing (resumed runs keep their noise stream)
    plain = sample_clip_sigmas(cfg, 64, 32, True, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(plain, sample_clip_sigmas(cfg, 64, 32, True, 0.5, torch.Generator().manual_seed(1),
                                                 clean_history_prob=0.0))
    s = sample_clip_sigmas(cfg, 4000, 32, False, 0.0, g, clean_history_prob=1.0, clean_history_noised_frac=0.25)
    noised = s > 0
    assert 0.23 < noised.float().mean() < 0.27
    prev_clean = torch.cat([torch.ones(4000, 1, dtype=torch.bool), ~noised[:, :-1]], 1)
    assert (noised & prev_clean).sum() / noised.sum() > 0.7  # most predicted frames follow a clean frame
    half = sample_clip_sigmas(cfg, 4000, 32, False, 0.0, g, clean_history_prob=0.5)
    sparse_clips = (half > 0).float().mean(1) < 0.5
    assert 0.45 < sparse_clips.float().mean() < 0.55
    with pytest.raises(ValueError, match="clean_history_prob"):
        sample_clip_sigmas(cfg, 2, 8, clean_history_prob=1.5)
    with pytest.raises(ValueError, match="clean_history_noised_frac"):
        sample_clip_sigmas(cfg, 2, 8, clean_history_prob=0.5, clean_history_noised_frac=0.0)


def moving_square_clip(b, t, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.zeros(b, t, size, size, 3, dtype=torch.uint8)
    x0 = torch.randint(0, size - 4, (b,), generator=g)
    for i in range(b):
        for j in range(t):
            x = (int(x0[i]) + j) % (size - 4)
            frames[i, j, 6:10, x:x + 4] = torch.tensor([255, 128, 0], dtype=torch.uint8)
    actions = torch.ones(b, t, dtype=torch.long)
    actions[:, 0] = 6
    rewards = (torch.arange(t) % 4 == 0).float().expand(b, t)
    return frames, actions, rewards


def test_training_smoke_loss_decreases():
    torch.manual_seed(0)
    m = WorldModel(tiny_config("full", n_layers=2))
    frames, actions, rewards = moving_square_clip(4, 8)
    terms = torch.zeros(4, 8)

    def eval_loss():
        with torch.no_grad():
            return diffusion_forcing_loss(m, frames, actions, rewards, terms,
                                          generator=torch.Generator().manual_seed(123))[0].item()

    before = eval_loss()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        loss, _ = diffusion_forcing_loss(m, frames, actions, rewards, terms, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)


def test_reward_weight_scales_only_the_reward_loss():
    m = WorldModel(tiny_config("full", n_layers=1))
    frames, actions, rewards = moving_square_clip(2, 4)
    with torch.no_grad():
        one, stats1 = diffusion_forcing_loss(m, frames, actions, rewards, generator=torch.Generator().manual_seed(1))
        three, stats3 = diffusion_forcing_loss(m, frames, actions, rewards, generator=torch.Generator().manual_seed(1),
                                               reward_weight=3.0)
    assert stats1["reward_loss"] == stats3["reward_loss"] > 0 and stats1["frame_loss"] == stats3["frame_loss"]
    assert three.item() == pytest.approx(one.item() + 2 * stats1["reward_loss"], rel=1e-5)


def test_default_config_size():
    m = WorldModel(WorldModelConfig())
    assert 1e6 <= m.num_params() <= 5e6
    assert m.n_tok == 64


def test_generate_with_explicit_noise_matches_generator():
    m = randomized(tiny_config("full"))
    frames, actions = clip(t=3)
    base = m.init_state(2)
    m.observe_clip(base, frames, actions)
    a = torch.tensor([1, 4])
    f1, r1, _ = m.generate(base.clone(), a, steps=2, generator=torch.Generator().manual_seed(5))
    noise = torch.randn((2, 1, 16, 16, 3), generator=torch.Generator().manual_seed(5))
    f2, r2, _ = m.generate(base.clone(), a, steps=2, noise=noise)
    assert torch.equal(f1, f2) and torch.equal(r1, r2)



def test_predict_leaves_the_state_and_is_generates_first_half():
    """predict samples the frame generate would and returns the expected reward generate reads
    with reward_from="denoiser", without advancing the state (an ensemble's members predict from
    their own states, then all observe one frame)."""
    m = randomized(tiny_config("full"))
    frames, actions = clip(t=3)
    base = m.init_state(2)
    m.observe_clip(base, frames, actions)
    a = torch.tensor([2, 5])
    noise = torch.randn((2, 1, 16, 16, 3), generator=torch.Generator().manual_seed(3))
    state = base.clone()
    f, expected = m.predict(state, a, steps=2, noise=noise)
    assert state.t.tolist() == base.t.tolist()
    assert all(torch.equal(x, y) for s, b in zip(state.ssm, base.ssm) for x, y in zip(s, b))
    g = base.clone()
    f2, r2, _ = m.generate(g, a, steps=2, noise=noise, reward_from="denoiser")
    assert torch.equal(f, f2) and torch.equal(expected, r2)
    m.observe(state, f, a)
    o1, o2 = m.observe(state, frames[:, 0], actions[:, 1]), m.observe(g, frames[:, 0], actions[:, 1])
    assert max_err(o1.raw, o2.raw) < 1e-6

@pytest.mark.parametrize("variant", ["full", "attn_full", "full+prev_frame"])
def test_index_copy_installs_warm_envs(variant):
    variant, m = variant_model(variant)
    frames, actions = clip(b=3, t=6)
    state = m.init_state(3)
    m.observe_clip(state, frames[:, :2], actions[:, :2])
    sub = m.init_state(1)
    m.observe_clip(sub, frames[1:2], actions[1:2])  # a longer warm-up for env 1
    state.index_copy_(torch.tensor([1]), sub)
    assert state.t.tolist() == [2, 6, 2]
    ref = m.observe(sub, frames[1:2, 0], actions[1:2, 1])
    out = m.observe(state, frames[:, 0], actions[:, 1])
    assert max_err(out.raw[1:2], ref.raw) < 1e-5


def test_pixel_head_starts_as_the_model_without_it_and_can_cancel_noise_per_pixel():
    """Zero-initialised, the refiner changes nothing; once trained it can correct every pixel,
    including noise in the patch directions that the d_model-wide tokens cannot reach (here a
    patch has 4x4x3 = 48 values and tokens are 32 wide)."""
    cfg = tiny_config("full")
    plain = randomized(cfg)
    torch.manual_seed(0)
    refined = WorldModel(dataclasses.replace(cfg, pixel_head=4))
    missing, unexpected = refined.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("pixel_refine.") for k in missing)
    refined.eval()
    frames, actions = clip(t=4)
    sigma = torch.full((2, 4), 0.3)
    noisy = frames.float() / 127.5 - 1 + 0.3 * torch.randn(2, 4, 16, 16, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert max_err(refined(noisy, sigma, actions).denoised, plain(noisy, sigma, actions).denoised) < 1e-6
    # the token path's output spans at most d_model directions per patch; the refiner's does not
    x = torch.randn(1, 1, 16, 16, 3)
    jac_plain = torch.autograd.functional.jacobian(lambda v: plain(v, torch.full((1, 1), 0.3), actions[:1, :1]).raw, x)
    with torch.no_grad():
        for p in refined.pixel_refine.parameters():
            p.normal_(0, 0.2)
    jac_ref = torch.autograd.functional.jacobian(lambda v: refined(v, torch.full((1, 1), 0.3), actions[:1, :1]).raw, x)
    patch = lambda j: j.reshape(16, 16, 3, 16, 16, 3)[:4, :4].reshape(48, 16 * 16 * 3)  # noqa: E731  one patch's rows
    rank = lambda j: int(torch.linalg.matrix_rank(patch(j), atol=1e-5))  # noqa: E731
    assert rank(jac_plain) <= cfg.d_model < rank(jac_ref) == 48
