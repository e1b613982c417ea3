"""Train the world model.

    python -m training.train tiny                       # seconds: smoke test on a tiny model
    python -m training.train maze-cpu                   # the shipped model (2-core CPU)
    python -m training.train maze-cpu --resume          # continue a killed run where it stopped
    torchrun --nproc-per-node 2 -m training.train tiny  # data-parallel (gloo on CPU, nccl on GPU)

Every field of `ssm_gym.train.config.TrainConfig` is a flag (`--help` lists them), e.g.
`--stage-clip-lens 16 32 64 --stage-steps 500 500 500 --model.d-model 192`.
"""

import tyro

from ssm_gym.train.config import PRESETS
from ssm_gym.train.trainer import train

if __name__ == "__main__":
    train(tyro.extras.overridable_config_cli(PRESETS))
