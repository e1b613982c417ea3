"""Model weights shipped inside the package (safetensors + JSON config, one folder each).

Every place that takes a world-model checkpoint (the envs' ``checkpoint=``, the CLIs'
``--checkpoint``) takes a folder path or the name of a shipped model (``"maze-latent"``);
None means the default, ``DEFAULT``."""

from pathlib import Path

from ssm_gym.model.checkpoint import CheckpointError

HERE = Path(__file__).resolve().parent
DEFAULT = "maze-cpu"


def shipped_names() -> list[str]:
    return sorted(p.name for p in HERE.iterdir() if (p / "config.json").is_file())


def shipped_checkpoint(name: str = DEFAULT) -> Path:
    """Folder of a shipped checkpoint; a clear error if this install does not have it."""
    path = HERE / name
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"no shipped checkpoint {name!r} in {HERE} (available: {shipped_names() or 'none yet'}); "
            "train one with `python -m training.train maze-cpu` and pass checkpoint='runs/maze-cpu/model'"
        )
    return path


def resolve_checkpoint(checkpoint: str | Path | None) -> Path:
    """A checkpoint as users give it -> its folder: None -> the default shipped model; an existing
    path -> itself; otherwise a bare name -> the shipped model of that name. A name that is
    neither is an error that lists the shipped ones."""
    if checkpoint is None:
        return shipped_checkpoint()
    path = Path(checkpoint)
    if path.exists() or len(path.parts) != 1:
        return path  # (a missing multi-part path: load_model says which folder is missing)
    if (HERE / path.name / "config.json").is_file():
        return HERE / path.name
    raise CheckpointError(f"{checkpoint}: no such checkpoint folder, nor a shipped model of that name "
                          f"(shipped: {shipped_names() or 'none'})")
