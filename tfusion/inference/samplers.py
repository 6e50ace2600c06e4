"""Diffusion samplers on a respaced schedule: DDPM ancestral and DDIM, plus CFG.

Respacing (Nichol & Dhariwal 2021): keep K of the T training steps, evenly spaced,
and treat them as a K-step chain with alpha_bar_i = alpha_bar[t_i]; the model is
still called with the original t_i. Step i goes from x at t_i to x at t_{i-1}
(alpha_bar_prev = 1 before the first kept step, i.e. the clean image).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

SAMPLERS = ("ddpm", "ddim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per sampling step i (i = 0 is the last one applied): float32/int32 [K]."""

    timesteps: jax.Array  # original training step t_i fed to the model
    alpha_bar: jax.Array  # alpha_bar[t_i]
    alpha_bar_prev: jax.Array  # alpha_bar[t_{i-1}], 1 for i = 0

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]


def respaced_timesteps(num_train_steps: int, steps: int) -> np.ndarray:
    """`steps` evenly spaced training steps from 0 to T-1, both ends included."""
    if not 0 < steps <= num_train_steps:
        raise ValueError(f"steps must be in (0, {num_train_steps}], got {steps}")
    if steps == 1:
        return np.asarray([num_train_steps - 1], np.int32)
    return np.unique(np.round(np.linspace(0, num_train_steps - 1, steps))).astype(np.int32)


def respaced_schedule(alpha_bar: np.ndarray, steps: int) -> Schedule:
    ts = respaced_timesteps(len(alpha_bar), steps)
    ab = np.asarray(alpha_bar, np.float64)[ts]
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    return Schedule(jnp.asarray(ts, jnp.int32), jnp.asarray(ab, jnp.float32),
                    jnp.asarray(ab_prev, jnp.float32))


def predict_x0(x_t, eps, alpha_bar, clip: float | None = None):
    x0 = (x_t - jnp.sqrt(1.0 - alpha_bar) * eps) / jnp.sqrt(alpha_bar)
    return x0 if clip is None else jnp.clip(x0, -clip, clip)


def ddpm_posterior(x0, x_t, alpha_bar, alpha_bar_prev):
    """Mean and variance of q(x_prev | x_t, x0) for the (respaced) step."""
    beta = 1.0 - alpha_bar / alpha_bar_prev
    denom = 1.0 - alpha_bar
    mean = (beta * jnp.sqrt(alpha_bar_prev) / denom) * x0 \
        + ((1.0 - alpha_bar_prev) * jnp.sqrt(1.0 - beta) / denom) * x_t
    var = beta * (1.0 - alpha_bar_prev) / denom  # 0 at the last step: no noise added
    return mean, var


def ddpm_step(x_t, eps, alpha_bar, alpha_bar_prev, noise, clip: float | None = None):
    """Ancestral step with the posterior ("small") variance."""
    x0 = predict_x0(x_t, eps, alpha_bar, clip)
    mean, var = ddpm_posterior(x0, x_t, alpha_bar, alpha_bar_prev)
    return mean + jnp.sqrt(var) * noise


def ddim_step(x_t, eps, alpha_bar, alpha_bar_prev, noise, clip: float | None = None,
              eta: float = 0.0):
    """Song et al. (2021); eta = 0 is deterministic, eta = 1 matches DDPM's variance."""
    x0 = predict_x0(x_t, eps, alpha_bar, clip)
    if clip is not None:  # keep eps consistent with the clipped x0
        eps = (x_t - jnp.sqrt(alpha_bar) * x0) / jnp.sqrt(1.0 - alpha_bar)
    var = eta ** 2 * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev)
    direction = jnp.sqrt(jnp.maximum(1.0 - alpha_bar_prev - var, 0.0)) * eps
    return jnp.sqrt(alpha_bar_prev) * x0 + direction + jnp.sqrt(var) * noise


def sampler_step(name: str, schedule: Schedule, i, x_t, eps, noise, clip=None):
    """One step i of sampler `name` (static) on `schedule`; i may be traced."""
    ab, ab_prev = schedule.alpha_bar[i], schedule.alpha_bar_prev[i]
    if name == "ddpm":
        return ddpm_step(x_t, eps, ab, ab_prev, noise, clip)
    if name == "ddim":
        return ddim_step(x_t, eps, ab, ab_prev, noise, clip)
    raise ValueError(f"unknown sampler {name!r}; choose from {SAMPLERS}")


def guide(eps_cond, eps_uncond, scale):
    """Classifier-free guidance: eps_u + s (eps_c - eps_u)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)
