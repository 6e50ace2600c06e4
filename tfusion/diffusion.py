"""DDPM noise schedules and forward noising (training side).

Timesteps are integers t in [0, T-1]; alpha_bar[t] is the signal fraction after
t + 1 noising steps (so t = 0 is slightly noisy, t = T-1 almost pure noise), as in
Ho et al. and Nichol & Dhariwal. Samplers (ancestral DDPM, DDIM, respacing, CFG)
live in tfusion/inference/.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal (2021): alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2)."""
    def f(t):
        return math.cos((t / num_steps + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f(i + 1) / f(i), max_beta) for i in range(num_steps)]
    return np.asarray(betas, np.float64)


def linear_betas(num_steps: int, start: float = 1e-4, end: float = 0.02) -> np.ndarray:
    """Ho et al. (2020) linear schedule, scaled to T steps as in Nichol & Dhariwal."""
    scale = 1000 / num_steps
    return np.linspace(scale * start, scale * end, num_steps, dtype=np.float64)


def make_betas(diffusion_cfg) -> np.ndarray:
    if diffusion_cfg.schedule == "cosine":
        return cosine_betas(diffusion_cfg.num_train_steps, diffusion_cfg.cosine_s,
                            diffusion_cfg.max_beta)
    if diffusion_cfg.schedule == "linear":
        return linear_betas(diffusion_cfg.num_train_steps)
    raise ValueError(f"config.diffusion.schedule: unknown {diffusion_cfg.schedule!r}")


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    return np.cumprod(1.0 - betas)


def q_sample(x0: jax.Array, t: jax.Array, noise: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """x_t = sqrt(alpha_bar[t]) x0 + sqrt(1 - alpha_bar[t]) eps; t broadcasts over x0's
    trailing latent axes (t [B, M] for x0 [B, M, H, W, C])."""
    ab = jnp.asarray(alpha_bar, jnp.float32)[t]
    ab = ab.reshape(ab.shape + (1,) * (x0.ndim - ab.ndim))
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def sample_timesteps(rng: jax.Array, t_max: jax.Array) -> jax.Array:
    """One t per image, uniform over the integers [0, t_max] (t_max per image)."""
    u = jax.random.uniform(rng, t_max.shape)
    return jnp.minimum(jnp.floor(u * (t_max + 1)).astype(jnp.int32), t_max)


def noise_images(rng: jax.Array, images: jax.Array, t_max: jax.Array, alpha_bar: jax.Array):
    """Draws t and epsilon and noises the whole latent (before patchify).

    images [B, M, H, W, C], t_max [B, M] -> (noisy images, t [B, M], noise).
    """
    t_rng, n_rng = jax.random.split(rng)
    t = sample_timesteps(t_rng, t_max)
    noise = jax.random.normal(n_rng, images.shape, jnp.float32)
    return q_sample(images, t, noise, alpha_bar), t, noise
