"""Outpainting: RePaint in pixel space, decode/re-mask/re-encode in latent space; one jitted, vmapped
reverse process per evaluation batch, configured by one `SamplerSpec`."""

from solidmark_jax.outpaint.latent import LatentOutpainter, make_latent_outpaint_fn
from solidmark_jax.outpaint.repaint import (
    Denoiser,
    Outpainter,
    make_outpaint_fn,
    num_denoiser_calls,
    repaint_levels,
    repaint_steps,
    sample,
)
from solidmark_jax.outpaint.spec import REMASK_FROM, SAMPLERS, SamplerSpec
