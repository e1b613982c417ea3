"""Train the frame autoencoder, the world model's optional latent space.

    python -m training.train_autoencoder --time-budget-s 1800 --out-dir runs/autoencoder
    python -m training.train_autoencoder --out-dir runs/autoencoder --resume   # continue a killed run

Then train a world model in its latent space:
`python -m training.train maze-cpu --autoencoder runs/autoencoder/model --model.latent-channels 8
--model.patch-size 2 ...` (see the README).
"""

import tyro

from ssm_gym.train.autoencoder import AutoencoderTrainConfig, train_autoencoder

if __name__ == "__main__":
    train_autoencoder(tyro.cli(AutoencoderTrainConfig))
