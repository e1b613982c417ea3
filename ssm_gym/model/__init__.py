"""World model core: block-wise Mamba-2 (SSD) scan, frame-local attention, diffusion forcing."""

from .attention import FrameLocalAttention, KVCache, TokenPool
from .autoencoder import FrameAutoencoder
from .diffusion import (
    diffusion_forcing_loss,
    open_loop_history,
    float_to_frames,
    frames_to_float,
    karras_sigmas,
    sample,
    still_targets,
)
from .ssm import HAS_MAMBA_SSM, BlockwiseSSM, cpu_kernel, ssd, ssd_chunked, ssd_fused_cpu, ssd_sequential
from .world_model import (
    VARIANTS,
    WorldModel,
    WorldModelConfig,
    WorldModelOutput,
    WorldModelState,
    incoming_actions,
)

__all__ = [
    "HAS_MAMBA_SSM",
    "VARIANTS",
    "BlockwiseSSM",
    "FrameAutoencoder",
    "FrameLocalAttention",
    "KVCache",
    "TokenPool",
    "WorldModel",
    "WorldModelConfig",
    "WorldModelOutput",
    "WorldModelState",
    "cpu_kernel",
    "diffusion_forcing_loss",
    "open_loop_history",
    "still_targets",
    "float_to_frames",
    "frames_to_float",
    "incoming_actions",
    "karras_sigmas",
    "sample",
    "ssd",
    "ssd_chunked",
    "ssd_fused_cpu",
    "ssd_sequential",
]
