"""Model adapters over diffusers' Flax classes."""

from solidmark_jax.models.unet import (
    CONDITIONS,
    ConditionedUNet,
    Denoiser,
    abstract_params,
    as_denoiser,
    build,
    init_params,
    validate,
)
