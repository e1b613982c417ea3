"""Model weights shipped inside the package (safetensors + JSON config, one folder each)."""

from pathlib import Path

from ssm_gym.model.checkpoint import CheckpointError

HERE = Path(__file__).resolve().parent
DEFAULT = "maze-cpu"


def shipped_checkpoint(name: str = DEFAULT) -> Path:
    """Folder of a shipped checkpoint; a clear error if this install does not have it."""
    path = HERE / name
    if not (path / "config.json").is_file():
        available = sorted(p.name for p in HERE.iterdir() if (p / "config.json").is_file())
        raise CheckpointError(
            f"no shipped checkpoint {name!r} in {HERE} (available: {available or 'none yet'}); "
            "train one with `python -m training.train maze-cpu` and pass checkpoint='runs/maze-cpu/model'"
        )
    return path
