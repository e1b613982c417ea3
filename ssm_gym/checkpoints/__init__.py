"""Model weights shipped inside the package (safetensors + JSON config, one folder each).

Every place that takes a world-model checkpoint (the envs' ``checkpoint=``, the CLIs'
``--checkpoint``, ``--init-from``) takes a model folder, a training run's folder (its
``model/``) or the name of a shipped model (``"maze-latent"``); None means ``DEFAULT``."""

from pathlib import Path

from ssm_gym.model.checkpoint import CONFIG_FILE, CheckpointError

HERE = Path(__file__).resolve().parent
DEFAULT = "maze-latent-ol"  # (the best on every measure but the next frame; see the README's Shipped models)


def shipped_names() -> list[str]:
    return sorted(p.name for p in HERE.iterdir() if (p / CONFIG_FILE).is_file())


def shipped_checkpoint(name: str = DEFAULT) -> Path:
    """Folder of a shipped checkpoint; a clear error if this install does not have it."""
    path = HERE / name
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"no shipped checkpoint {name!r} in {HERE} (available: {shipped_names() or 'none yet'}); "
            "train one with `python -m training.train maze-cpu` and pass checkpoint='runs/maze-cpu/model'"
        )
    return path


def resolve_checkpoint(checkpoint: str | Path | None) -> Path:
    """A checkpoint as users give it -> its model folder, in this order: None -> the default
    shipped model; a folder holding a model (or a run folder holding ``model/``); a bare name
    (no slash) of a shipped model. Anything else is returned as given for ``load_model`` to say
    what is missing, except a bare name that matches nothing: an error listing the shipped ones."""
    if checkpoint is None:
        return shipped_checkpoint()
    path = Path(checkpoint)
    for folder in (path, path / "model"):
        if (folder / CONFIG_FILE).is_file():
            return folder
    text = str(checkpoint)
    if "/" not in text and "\\" not in text:
        if (HERE / text / CONFIG_FILE).is_file():
            return HERE / text
        if not path.exists():
            raise CheckpointError(f"{checkpoint}: no such checkpoint folder, nor a shipped model of that name "
                                  f"(shipped: {shipped_names() or 'none'})")
    return path


def load_world_model(checkpoint: str | Path | None = None, device="cpu"):
    """The world model a user's checkpoint argument names (see :func:`resolve_checkpoint`), loaded
    on ``device`` in eval mode."""
    from ssm_gym.model.checkpoint import load_model

    return load_model(resolve_checkpoint(checkpoint), device)
