"""Noise schedules and reverse-process steps."""

from solidmark_jax.diffusion.schedule import (
    NoiseSchedule,
    abar_at,
    ddim_step,
    ddpm_step,
    forward_jump,
    make_schedule,
    predict_x0,
    q_sample,
    sampling_timesteps,
)
