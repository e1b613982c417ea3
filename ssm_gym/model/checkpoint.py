"""World-model checkpoints: safetensors weights plus a JSON config, written atomically, read
with checks that name the problem (missing file, corrupt file, config from other code).

A checkpoint is a folder:

    config.json         {"format": "ssm-gym-world-model", "format_version": 1,
                         "model": {...WorldModelConfig fields...}, "meta": {...free-form...}}
    model.safetensors   the weights used for sampling (the EMA weights of a training run)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .world_model import WorldModel, WorldModelConfig

FORMAT = "ssm-gym-world-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match this code. The message says which."""


def config_to_dict(config: WorldModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


# Fields added to WorldModelConfig after format_version 1, with the value that reproduces what
# checkpoints written before them compute. Only these may be absent from a checkpoint.
ADDED_FIELDS: dict[str, Any] = {"action_tokens": False, "prev_frame": False, "null_action": False,
                                "action_guidance": 1.0, "pixel_head": 0, "latent_channels": 0, "latent_downsample": 4,
                                "latent_width": 16}


def config_from_dict(d: dict[str, Any], where: str = "config") -> WorldModelConfig:
    """Strict: unknown or missing fields are an error, never silently defaulted (except the
    fields listed in ADDED_FIELDS, which older checkpoints predate)."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: 'model' must be a JSON object, got {type(d).__name__}")
    d = {**ADDED_FIELDS, **d}
    known = {f.name for f in dataclasses.fields(WorldModelConfig)}
    unknown, missing = sorted(set(d) - known), sorted(known - set(d))
    if unknown or missing:
        raise CheckpointError(
            f"{where}: model config does not match this code"
            + (f"; fields unknown to this code: {unknown}" if unknown else "")
            + (f"; fields missing from the checkpoint: {missing}" if missing else "")
        )
    try:
        return WorldModelConfig(**d)
    except (AssertionError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid model config ({e})") from None


def write_folder_atomically(path: Path, write) -> None:
    """Write into a temporary sibling folder, then swap it in, so a crash never leaves a
    half-written checkpoint under `path` (the previous one stays intact until the swap)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is for everyone
        for f in tmp.rglob("*"):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write(path: Path, doc: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """A checkpoint folder: the weights and the JSON document, written atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / WEIGHTS_FILE))
        (folder / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")

    write_folder_atomically(path, write)
    return path


def _read_doc(path: Path, fmt: str, what: str) -> dict:
    """The checked JSON document of a checkpoint folder of format ``fmt``."""
    cfg_path = path / CONFIG_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path}: {what} folder not found")
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: missing (a {what} folder holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        doc = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise CheckpointError(f"{cfg_path}: not an ssm-gym {what} (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path}: format_version {doc.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    return doc


def save_model(path: str | Path, model: WorldModel, meta: dict | None = None,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Save `model`'s config and weights (or `state_dict`, e.g. EMA weights) to folder `path`."""
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": config_to_dict(model.config), "meta": meta or {}}
    return _write(Path(path), doc, state_dict or model.state_dict())


def read_config(path: str | Path) -> tuple[WorldModelConfig, dict]:
    """(model config, meta) of the checkpoint folder `path`."""
    path = Path(path)
    doc = _read_doc(path, FORMAT, "world-model checkpoint")
    return config_from_dict(doc.get("model"), str(path / CONFIG_FILE)), doc.get("meta", {})


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    w_path = Path(path) / WEIGHTS_FILE
    if not w_path.is_file():
        raise CheckpointError(f"{w_path}: missing")
    try:
        return load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{w_path}: corrupt or truncated weights file ({e})") from None


def check_state_dict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = [f"{k}: {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensors (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
        if wrong:
            parts.append(f"shape mismatches (checkpoint vs config): {wrong[:3]}")
        raise CheckpointError(f"{where}: weights do not match the config: " + "; ".join(parts))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> WorldModel:
    """Build the model described by the checkpoint folder `path` and load its weights (eval mode)."""
    config, _ = read_config(path)
    model = WorldModel(config)
    tensors = read_weights(path)
    check_state_dict(model, tensors, str(Path(path) / WEIGHTS_FILE))
    model.load_state_dict(tensors)
    return model.to(device).eval()


# -- the frame autoencoder (a world model's latent space; see autoencoder.py) -------------------
AE_FORMAT = "ssm-gym-autoencoder"
AE_FIELDS = ("channels", "latent_channels", "downsample", "width")


def save_autoencoder(path: str | Path, ae, meta: dict | None = None) -> Path:
    """Save a FrameAutoencoder (config + weights, its latent scale included) to folder `path`."""
    doc = {"format": AE_FORMAT, "format_version": FORMAT_VERSION,
           "model": ae.fields,
           "meta": meta or {}}
    return _write(Path(path), doc, ae.state_dict())


def load_autoencoder(path: str | Path):
    """The FrameAutoencoder saved in folder `path` (eval mode), with the same checks as load_model."""
    from .autoencoder import FrameAutoencoder

    path = Path(path)
    cfg_path = path / CONFIG_FILE
    fields = _read_doc(path, AE_FORMAT, "autoencoder").get("model")
    if not isinstance(fields, dict) or sorted(fields) != sorted(AE_FIELDS):
        raise CheckpointError(f"{cfg_path}: autoencoder config must have exactly the fields {list(AE_FIELDS)}, "
                              f"got {fields!r}")
    try:
        ae = FrameAutoencoder(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: invalid autoencoder config ({e})") from None
    tensors = read_weights(path)
    check_state_dict(ae, tensors, str(path / WEIGHTS_FILE))
    ae.load_state_dict(tensors)
    return ae.eval()
