"""Trainer: a tiny run end to end, exact resume after a kill, DDP on 2 CPU processes, safe checkpoints."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ssm_gym.maze.dataset import load_episode, save_episode
from ssm_gym.maze.record import record_episodes
from ssm_gym.maze.sim import FORWARD_ACTIONS, TURN_ONLY
from ssm_gym.model.checkpoint import CheckpointError, load_model
import ssm_gym.train.trainer as trainer_mod
from ssm_gym.train.config import PRESETS
from ssm_gym.train.trainer import latest_checkpoint, lr_at, temporal_chunks, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for folder, seeds in (("train", range(6)), ("val", range(100, 102))):
        eps = record_episodes(list(seeds), ["explore"] * len(seeds), steps=30)
        for s, ep in zip(seeds, eps):
            save_episode(root / folder / f"ep_{s:06d}.npz", ep)
    return root


def tiny(data, out_dir, **kw):
    cfg = dataclasses.replace(PRESETS["tiny"][1], data_dir=data / "train", val_dir=data / "val", out_dir=out_dir)
    return dataclasses.replace(cfg, **kw)


def cli(data, out_dir, *extra):
    return [sys.executable, "-m", "training.train", "tiny", "--data-dir", str(data / "train"),
            "--val-dir", str(data / "val"), "--out-dir", str(out_dir), *extra]


@pytest.mark.parametrize("field", ["ckpt_every", "log_every", "val_every", "keep_checkpoints", "tbptt_frames"])
def test_bad_intervals_rejected(field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(PRESETS["tiny"][1], **{field: 0}).validate()


@pytest.mark.parametrize("field,value", [("clean_history_prob", 1.5), ("clean_history_noised_frac", 0.0)])
def test_bad_noise_pattern_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(PRESETS["tiny"][1], **{field: value}).validate()


def test_noised_copies_conflicting_options_rejected():
    base = dataclasses.replace(PRESETS["tiny"][1], noised_copies=True)
    base.validate()
    with pytest.raises(ValueError, match="clean_history_prob"):
        dataclasses.replace(base, clean_history_prob=0.5).validate()
    with pytest.raises(ValueError, match="compression"):
        dataclasses.replace(base, compression="strong").validate()


def test_noised_copies_run_trains_and_carries_state(data, tmp_path):
    """A tiny run with noised copies, its clips cut into truncated-BPTT pieces (state carried):
    the loss is finite and falls from the first logged steps to the last."""
    final = train(tiny(data, tmp_path / "run", noised_copies=True, stage_steps=(10, 10), lr=3e-3))
    rows = [r.split(",") for r in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]]
    losses = [float(r[4]) for r in rows]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert load_model(final).config == PRESETS["tiny"][1].model


def spy_on(monkeypatch, name: str, record) -> list:
    """Wrap the trainer's ``name``: each call appends ``record(args, kwargs, result)`` to the list returned."""
    seen, real = [], getattr(trainer_mod, name)

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(record(args, kwargs, out))
        return out

    monkeypatch.setattr(trainer_mod, name, spy)
    return seen


def test_noised_copies_mixed_with_diffusion_forcing(data, tmp_path, monkeypatch):
    """noised_copies_prob: a seeded share of the steps trains copies, the rest plain diffusion forcing."""
    with pytest.raises(ValueError, match="noised_copies_prob"):
        dataclasses.replace(PRESETS["tiny"][1], noised_copies=True, noised_copies_prob=1.5).validate()
    with pytest.raises(ValueError, match="--noised-copies"):
        dataclasses.replace(PRESETS["tiny"][1], noised_copies_prob=0.5).validate()
    cfg = dataclasses.replace(PRESETS["tiny"][1], noised_copies=True, noised_copies_prob=0.3)
    draws = [cfg.step_objective(s)[0] for s in range(2000)]
    assert draws == [cfg.step_objective(s)[0] for s in range(2000)]  # a resumed run draws the same
    assert 0.25 < sum(draws) / len(draws) < 0.35
    assert not any(dataclasses.replace(cfg, noised_copies=False, noised_copies_prob=1.0).step_objective(s)[0]
                   for s in range(50))

    seen = spy_on(monkeypatch, "diffusion_forcing_loss", lambda args, kw, out: kw.get("noised_copies", False))
    run = tiny(data, tmp_path / "run", noised_copies=True, noised_copies_prob=0.5, stage_steps=(10, 10))
    train(run)
    expected = [run.step_objective(s)[0] for s in range(run.total_steps)]
    assert True in expected and False in expected
    # one call per truncated-BPTT piece, each with its step's objective
    pieces = [len(temporal_chunks(run.stage_clip_lens[run.stage_at(s)], run.tbptt_frames)) for s in range(run.total_steps)]
    assert seen == [c for s, c in enumerate(expected) for _ in range(pieces[s])]


def test_open_loop_history_steps(data, tmp_path, monkeypatch):
    """open_loop_prob: a seeded share of the copies steps reads the model's own imagination after
    open_loop_context real frames; the run trains and resumes its draws."""
    for bad, match in (({"open_loop_prob": 0.5}, "--noised-copies"),
                       ({"noised_copies": True, "open_loop_prob": -0.1}, "open_loop_prob"),
                       ({"noised_copies": True, "open_loop_context": 0}, "open_loop_context"),
                       ({"noised_copies": True, "open_loop_drop_blocked": True}, "--open-loop-prob"),
                       ({"noised_copies": True, "open_loop_still_targets": True}, "--open-loop-prob"),
                       ({"noised_copies": True, "open_loop_reward_weight": 5.0}, "--open-loop-prob"),
                       ({"noised_copies": True, "open_loop_prob": 0.5, "open_loop_reward_weight": -1.0},
                        "open_loop_reward_weight")):
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(PRESETS["tiny"][1], **bad).validate()
    cfg = dataclasses.replace(PRESETS["tiny"][1], noised_copies=True, noised_copies_prob=0.5, open_loop_prob=0.5)
    draws = [cfg.step_objective(s) for s in range(2000)]
    assert not any(ol and not copies for copies, ol in draws)  # open loop only on copies steps
    assert 0.2 < sum(ol for _, ol in draws) / len(draws) < 0.3

    calls = spy_on(monkeypatch, "open_loop_history", lambda args, kw, out: (args[1].shape[1], args[3], out))
    seen = spy_on(monkeypatch, "diffusion_forcing_loss", lambda args, kw, out: kw.get("history"))
    weights = spy_on(monkeypatch, "diffusion_forcing_loss", lambda args, kw, out: kw.get("history_reward_weight"))
    run = tiny(data, tmp_path / "run", noised_copies=True, open_loop_prob=1.0, open_loop_context=6,
               stage_steps=(3, 3), tbptt_frames=8, open_loop_reward_weight=4.0)
    train(run)
    assert weights and set(weights) == {4.0}
    # every step open loop; the context is capped at clip length - 1 (clips of 4, then 8 frames)
    assert [(t, c) for t, c, _ in calls] == [(4, 3)] * 3 + [(8, 6)] * 3
    assert len(seen) == len(calls) and all(torch.equal(h, out) for h, (_, _, out) in zip(seen, calls))
    rows = [r.split(",") for r in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]]
    assert rows and all(math.isfinite(float(r[4])) for r in rows)


def test_open_loop_history_drops_blocked_moves(data, tmp_path, monkeypatch):
    """open_loop_drop_blocked: the imagination takes the clip's actions with every move a wall
    cancelled taken out (the dataset's effective_actions); the copies keep the real actions.
    open_loop_still_targets: the copies' targets are still_targets of the step's history.
    blocked_clip_prob=1: every clip holds such a move after its first frame."""
    for s, ep in zip(range(4), record_episodes(list(range(4)), ["stumble"] * 4, steps=30)):
        save_episode(tmp_path / "stumble" / f"ep_{s:06d}.npz", ep)  # walks into walls: blocked moves
    calls = spy_on(monkeypatch, "open_loop_history", lambda args, kw, out: (args[2], kw["imagine_actions"]))
    seen = spy_on(monkeypatch, "diffusion_forcing_loss", lambda args, kw, out: args[2])
    targets = spy_on(monkeypatch, "still_targets", lambda args, kw, out: out)
    aimed = spy_on(monkeypatch, "diffusion_forcing_loss", lambda args, kw, out: (kw["history"], kw["copy_targets"]))
    run = tiny(data, tmp_path / "run", data_dir=tmp_path / "stumble", noised_copies=True, open_loop_prob=1.0,
               open_loop_drop_blocked=True, open_loop_still_targets=True, stage_steps=(4, 4), tbptt_frames=8,
               blocked_clip_prob=1.0)
    train(run)
    assert len(calls) == run.total_steps
    changed = 0
    for real, taken in calls:
        assert taken is not None and taken.shape == real.shape
        diff = real != taken  # only moves (forward, forward_left, forward_right) may change, into their turn
        assert all(int(a) in FORWARD_ACTIONS for a in real[diff])
        assert torch.equal(taken[diff], torch.as_tensor(TURN_ONLY)[real[diff]])
        changed += int(diff.sum())
        assert diff[:, 1:].any(1).all(), "blocked_clip_prob=1: a cancelled move in every clip"
    assert changed > 0, "the stumble policy walks into walls: some move must be dropped"
    assert len(seen) == len(calls) and all(torch.equal(a, real) for a, (real, _) in zip(seen, calls))
    assert len(targets) == len(aimed) == len(calls) and all(torch.equal(t, c) for t, (_, c) in zip(targets, aimed))
    assert any(not torch.equal(t[:, 1:], h[:, 1:]) for t, (h, _) in zip(targets, aimed))


def test_schedule_and_chunks():
    cfg = PRESETS["tiny"][1]
    assert lr_at(cfg, 0) < lr_at(cfg, cfg.warmup_steps - 1) <= cfg.lr
    assert abs(lr_at(cfg, cfg.total_steps - 1) - cfg.lr * cfg.min_lr_ratio) < 0.05 * cfg.lr
    assert temporal_chunks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert [cfg.stage_at(s) for s in range(cfg.total_steps)] == [0] * 6 + [1] * 6


def test_time_budget_schedule():
    cfg = dataclasses.replace(PRESETS["tiny"][1], time_budget_s=100.0, stage_steps=(1, 3))
    # stages follow the elapsed fraction of the budget: 1/4 in the first, 3/4 in the second
    assert [cfg.stage_at_progress(cfg.progress(0, t)) for t in (0, 20, 26, 60, 99, 150)] == [0, 0, 1, 1, 1, 1]
    late = cfg.warmup_steps + 5
    assert cfg.lr >= lr_at(cfg, late, 1.0) > lr_at(cfg, late, 50.0) > lr_at(cfg, late, 99.0)
    assert abs(lr_at(cfg, late, 100.0) - cfg.lr * cfg.min_lr_ratio) < 1e-12
    with pytest.raises(ValueError, match="time_budget_s"):
        dataclasses.replace(cfg, time_budget_s=0.0).validate()


def test_time_budget_run_stops_on_time_and_resumes_with_the_rest(data, tmp_path):
    out = tmp_path / "timed"
    cfg = tiny(data, out, time_budget_s=4.0, stage_steps=(1, 1), ckpt_every=2, val_every=10**6)
    t0 = time.perf_counter()
    model = load_model(train(cfg))
    assert time.perf_counter() - t0 < 60
    meta = json.loads((out / "model" / "config.json").read_text())["meta"]
    assert meta["train_seconds"] >= 4.0 and meta["step"] > 0
    rows = [r.split(",") for r in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert {r[2] for r in rows} == {"4", "8"}  # both curriculum stages ran, by time
    assert int(rows[-1][0]) == meta["step"]
    assert model.config == cfg.model
    # Resuming a finished timed run finds its budget spent: it trains no further step.
    t0 = time.perf_counter()
    train(dataclasses.replace(cfg, resume=True))
    assert time.perf_counter() - t0 < 3.0
    assert json.loads((out / "model" / "config.json").read_text())["meta"]["step"] == meta["step"]


def test_tiny_run_end_to_end(data, tmp_path):
    out = tmp_path / "run"
    final = train(tiny(data, out))
    model = load_model(final)
    assert model.config == PRESETS["tiny"][1].model
    # The maze never terminates: the trained termination head must say so on real data.
    val = load_episode(sorted((data / "val").glob("*.npz"))[0])
    prev = torch.tensor(np.concatenate([[model.START], val["action"][1:].argmax(-1)]))[None]
    pred = model.observe_clip(model.init_state(1), torch.from_numpy(val["image"])[None], prev)
    assert (pred.term_logit < 0).all()
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and int(rows[-1].split(",")[0]) == 12
    assert all(np.isfinite(float(r.split(",")[4])) for r in rows[1:])
    val = (out / "val.csv").read_text().splitlines()
    assert len(val) >= 2 and 0 < float(val[-1].split(",")[1]) < 100
    assert val[0].endswith("true_action_best,psnr_between_actions") and 0 <= float(val[-1].split(",")[4]) <= 1
    assert latest_checkpoint(out).name == "step_0000012"
    assert len(list((out / "checkpoints").glob("step_*"))) <= 3
    # The curriculum changed the clip length and kept frames per step about constant.
    stages = {r.split(",")[2]: r.split(",")[3] for r in rows[1:]}
    assert stages == {"4": "4", "8": "2"}
    # Export for shipping: the EMA model plus its validation numbers; optional never-terminate head.
    from training.export import Args as ExportArgs, export

    shipped = export(ExportArgs(run=out, name="tiny", never_terminates=True, dest_root=tmp_path / "pkg", note="lineage"))
    exported = load_model(shipped)
    assert exported.head[2].bias[1] == -10.0 and (exported.head[2].weight[1] == 0).all()
    assert json.loads((shipped / "config.json").read_text())["meta"]["validation"]["step"] == "12"
    assert json.loads((shipped / "config.json").read_text())["meta"]["note"] == "lineage"
    # A new run never overwrites an old one.
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny(data, out))
    with pytest.raises(ValueError, match="config differs"):
        train(tiny(data, out, resume=True, lr=1.0))


def test_extra_data_dirs_train_and_resume(data, tmp_path):
    """A run on two folders of episodes records both, and --resume accepts it; a run made before
    a config field existed (the field absent from its train_config.json) resumes with the default."""
    out = tmp_path / "run"
    train(tiny(data, out, extra_data_dirs=(data / "val",), stage_steps=(1, 1), ckpt_every=1))
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["extra_data_dirs"] == [str(data / "val")]
    train(tiny(data, out, extra_data_dirs=(data / "val",), stage_steps=(1, 1), ckpt_every=1, resume=True))
    with pytest.raises(ValueError, match="extra_data_dirs"):
        train(tiny(data, out, stage_steps=(1, 1), ckpt_every=1, resume=True))
    del saved["extra_data_dirs"]
    (out / "train_config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="extra_data_dirs"):  # absent = the default (), not the folder given
        train(tiny(data, out, extra_data_dirs=(data / "val",), stage_steps=(1, 1), ckpt_every=1,
                   resume=True))
    train(tiny(data, out, stage_steps=(1, 1), ckpt_every=1, resume=True))


def test_resume_after_kill_loses_at_most_one_interval_and_matches(data, tmp_path):
    steps = ["--stage-steps", "15", "15", "--ckpt-every", "5", "--val-every", "100", "--log-every", "1"]
    ref = tmp_path / "ref"
    subprocess.run(cli(data, ref, *steps), check=True, cwd=ROOT, capture_output=True)

    run = tmp_path / "killed"
    proc = subprocess.Popen(cli(data, run, *steps), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        ck = latest_checkpoint(run) if (run / "checkpoints" / "latest").exists() else None
        if ck is not None and int(ck.name.split("_")[1]) >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(int(r.split(",")[0]) for r in (run / "metrics.csv").read_text().splitlines()[1:])
    resumed_from = int(latest_checkpoint(run).name.split("_")[1])
    assert 10 <= resumed_from < 30, "the run was killed mid-way"
    assert killed_at - resumed_from <= 5, "at most one checkpoint interval is lost"
    subprocess.run(cli(data, run, *steps, "--resume"), check=True, cwd=ROOT, capture_output=True)
    a = load_file(str(ref / "model" / "model.safetensors"))
    b = load_file(str(run / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    steps_logged = [int(r.split(",")[0]) for r in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert steps_logged == list(range(1, 31)), "rows after the checkpoint are replaced, not duplicated"


def test_corrupt_and_mismatched_checkpoints_are_clear_errors(data, tmp_path):
    out = tmp_path / "run"
    final = train(tiny(data, out, stage_steps=(2, 2), val_every=100))
    weights = final / "model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(final)
    weights.write_bytes(blob)
    cfg = json.loads((final / "config.json").read_text())
    # a checkpoint written before a later-added field loads with the field's old behaviour...
    del cfg["model"]["action_tokens"]
    (final / "config.json").write_text(json.dumps(cfg))
    assert load_model(final).config.action_tokens is False
    # ...but any other missing field is an error
    p_mean = cfg["model"].pop("p_mean")
    (final / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing from the checkpoint.*p_mean"):
        load_model(final)
    cfg["model"]["p_mean"] = p_mean
    cfg["model"]["d_model"] = 48
    (final / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not match the config"):
        load_model(final)
    cfg["model"]["new_knob"] = 1
    (final / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="new_knob"):
        load_model(final)
    (final / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(final)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nowhere")
    # A damaged training checkpoint stops --resume with the file named.
    ck = latest_checkpoint(out)
    (ck / "train_state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="train_state|corrupt"):
        train(tiny(data, out, stage_steps=(2, 2), val_every=100, resume=True))


@pytest.mark.parametrize("timed,copies", [(False, False), (True, False), (False, True)])
def test_ddp_two_cpu_processes(data, tmp_path, timed, copies):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(29533 + timed + 2 * copies),
           "-m", "training.train", "tiny", "--data-dir", str(data / "train"), "--val-dir", str(data / "val"),
           "--out-dir", str(out), "--stage-steps", "3", "3", "--val-every", "100"]
    if timed:  # both processes must stop at the same step (rank 0's clock decides)
        cmd += ["--time-budget-s", "3", "--ckpt-every", "1000"]
    if copies:  # the paired pass goes through the DDP wrapper's forward
        cmd += ["--noised-copies"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    model = load_model(out / "model")
    rows = (out / "metrics.csv").read_text().splitlines()
    assert int(rows[-1].split(",")[0]) == (json.loads((out / "model" / "config.json").read_text())["meta"]["step"] if timed else 6)
    assert rows[1].split(",")[3] == "4", "batch counts clips over both processes"
    assert model.num_params() > 0


def test_init_from_starts_from_given_weights_and_checks_config(data, tmp_path):
    first = train(tiny(data, tmp_path / "a"))
    cfg = tiny(data, tmp_path / "b", init_from=first, stage_steps=(1, 1), lr=1e-12, warmup_steps=1, ema_decay=0.0)
    tuned = load_model(train(cfg))
    before = load_model(first)
    # a (near) zero learning rate keeps the starting weights: the run really started from them
    for (k, a), b in zip(before.state_dict().items(), tuned.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
    other = dataclasses.replace(cfg.model, d_model=48)
    with pytest.raises(ValueError, match="init-from.*d_model: 48 vs 32|init-from.*d_model"):
        train(dataclasses.replace(cfg, out_dir=tmp_path / "c", model=other))
    # training-noise and sampling fields may change in a fine-tune; the result keeps the new ones
    noisier = dataclasses.replace(cfg.model, p_mean=0.5, sample_steps=1)
    tuned = load_model(train(dataclasses.replace(cfg, out_dir=tmp_path / "d", model=noisier)))
    assert tuned.config.p_mean == 0.5 and tuned.config.sample_steps == 1
    # per-position action tokens and the previous-frame input may be switched on: they start at
    # zero, the rest is loaded
    grown_cfg = dataclasses.replace(cfg, out_dir=tmp_path / "e", action_dropout=0.5, model=dataclasses.replace(
        cfg.model, action_tokens=True, prev_frame=True, null_action=True, action_guidance=1.5, pixel_head=4))
    grown = load_model(train(grown_cfg))
    assert grown.config.pixel_head == 4 and grown.pixel_refine[-1].weight.abs().max() < 1e-6
    assert grown.config.action_tokens and grown.action_tok.weight.abs().max() < 1e-6
    assert grown.config.prev_frame and grown.prev_in.weight.abs().max() < 1e-6
    assert grown.config.null_action and grown.action_null.abs().max() < 1e-6
    assert grown.config.action_guidance == 1.5
    for k, a in before.state_dict().items():
        assert torch.allclose(a, grown.state_dict()[k], atol=1e-6), k
    # ...but not switched off again (weights would be dropped)
    with pytest.raises(ValueError, match="init-from.*action_tokens"):
        train(dataclasses.replace(cfg, out_dir=tmp_path / "f", init_from=tmp_path / "e" / "model"))
    with pytest.raises(ValueError, match="init-from.*pixel_head"):
        train(dataclasses.replace(grown_cfg, out_dir=tmp_path / "h", init_from=tmp_path / "e" / "model",
                                  model=dataclasses.replace(grown_cfg.model, pixel_head=0)))
    # nor resized: the refiner's weights would not fit
    with pytest.raises(ValueError, match="init-from.*pixel_head"):
        train(dataclasses.replace(grown_cfg, out_dir=tmp_path / "g", init_from=tmp_path / "e" / "model",
                                  model=dataclasses.replace(grown_cfg.model, pixel_head=8)))


def test_action_dropout_needs_the_null_action(data, tmp_path):
    cfg = tiny(data, tmp_path / "a", action_dropout=0.2)
    with pytest.raises(ValueError, match="null action"):
        train(cfg)
    with pytest.raises(ValueError, match="action_dropout must be in"):
        train(dataclasses.replace(cfg, action_dropout=1.5, model=dataclasses.replace(cfg.model, null_action=True)))


def test_csv_log_keeps_rows_when_its_columns_change(tmp_path):
    """A run resumed by a newer version: old rows stay under their column names, new columns empty."""
    from ssm_gym.train.trainer import CSVLog

    path = tmp_path / "val.csv"
    old = CSVLog(path, ["step", "psnr"])
    old.write({"step": 10, "psnr": 17.5})
    new = CSVLog(path, ["step", "psnr", "true_action_best"])
    new.write({"step": 20, "psnr": 18.0, "true_action_best": 0.4})
    assert path.read_text().splitlines() == ["step,psnr,true_action_best", "10,17.5,", "20,18.0,0.4"]
    CSVLog(path, ["step", "psnr", "true_action_best"])  # same columns: untouched
    assert path.read_text().splitlines()[-1] == "20,18.0,0.4"


def test_object_loss_weight_reaches_the_loss(data, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="object_loss_weight"):
        dataclasses.replace(PRESETS["tiny"][1], object_loss_weight=-1.0).validate()
    seen = spy_on(monkeypatch, "diffusion_forcing_loss",
                  lambda args, kw, out: None if kw.get("space_weight") is None else tuple(kw["space_weight"].shape))
    run = tiny(data, tmp_path / "run", object_loss_weight=4.0, stage_steps=(2, 2))
    train(run)
    assert seen and all(s is not None and s[2:] == run.model.space_shape[:2] for s in seen)
