"""Noise schedules and reverse-process steps."""

from solidmark_jax.diffusion.schedule import (
    PREDICTION_TYPES,
    NoiseSchedule,
    abar_at,
    check_prediction_type,
    ddim_step,
    ddim_update,
    ddpm_step,
    ddpm_update,
    eps_denoiser,
    forward_jump,
    make_schedule,
    predict_x0,
    q_sample,
    sampling_timesteps,
    training_target,
    v_to_eps,
    velocity,
)
