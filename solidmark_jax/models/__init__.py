"""Model adapters over diffusers' Flax classes."""

from solidmark_jax.models.unet import (
    CONDITIONS,
    DTYPES,
    ConditionedUNet,
    Denoiser,
    abstract_params,
    as_denoiser,
    build,
    init_params,
    validate,
    with_remat,
)
from solidmark_jax.models.unet import build_for_config, load_pretrained_unet_params, pretrained_unet_dir
