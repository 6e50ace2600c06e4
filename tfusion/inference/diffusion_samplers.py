"""Diffusion samplers on a K-step schedule, for any prediction, plus CFG.

ddpm process (Nichol & Dhariwal respacing): keep K of the T training steps,
evenly spaced, and treat them as a K-step chain with alpha_bar_i = alpha_bar[t_i];
the model is still called with the original t_i. Samplers "ddpm" (ancestral) and
"ddim" (eta = 0).

flow process: K + 1 times from 1 to 0, evenly spaced then shifted like training
times (diffusion.shift_flow_time). Samplers "euler" and "heun" (Karras et al. 2022:
Euler, then the trapezoid with the velocity at the Euler point; plain Euler on
the last step, which ends at t = 0).

Step i goes from x at level i to x at level i - 1 (i = 0 ends on the clean image).
The model output is converted to (x0, eps) exactly (diffusion.to_x0_eps) before a
step, and the x0 clip is applied there, so every sampler works for eps, v and x0.
CFG is applied to the model output: every conversion is affine in the output
with the same x_t, so guiding the output equals guiding eps, x0 or the velocity.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tfusion import diffusion
from tfusion.config import SAMPLERS_BY_PROCESS

SAMPLERS = SAMPLERS_BY_PROCESS["ddpm"] + SAMPLERS_BY_PROCESS["flow"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per sampling step i (i = 0 is the last one applied): float32 [K] each.

    x at step i's level is signal[i] x0 + noise[i] eps; the step ends at the
    level (signal_prev[i], noise_prev[i]), which is (1, 0) for i = 0."""

    model_time: jax.Array  # the model's timestep input at level i
    signal: jax.Array
    noise: jax.Array
    signal_prev: jax.Array
    noise_prev: jax.Array
    model_time_prev: jax.Array  # the model input at level i - 1 (Heun's second call)

    @property
    def num_steps(self) -> int:
        return self.model_time.shape[0]


def respaced_timesteps(num_train_steps: int, steps: int) -> np.ndarray:
    """`steps` evenly spaced training steps from 0 to T-1, both ends included."""
    if not 0 < steps <= num_train_steps:
        raise ValueError(f"steps must be in (0, {num_train_steps}], got {steps}")
    if steps == 1:
        return np.asarray([num_train_steps - 1], np.int32)
    return np.unique(np.round(np.linspace(0, num_train_steps - 1, steps))).astype(np.int32)


def _schedule(model_time, signal, noise, clean_model_time=0.0) -> Schedule:
    f32 = lambda a: jnp.asarray(np.asarray(a, np.float64), jnp.float32)
    prev = lambda a, first: np.concatenate([[first], np.asarray(a, np.float64)[:-1]])
    return Schedule(f32(model_time), f32(signal), f32(noise), f32(prev(signal, 1.0)),
                    f32(prev(noise, 0.0)), f32(prev(model_time, clean_model_time)))


def respaced_schedule(alpha_bar: np.ndarray, steps: int) -> Schedule:
    """ddpm: K of the T steps of `alpha_bar` (already shifted, if configured)."""
    ts = respaced_timesteps(len(alpha_bar), steps)
    ab = np.asarray(alpha_bar, np.float64)[ts]
    return _schedule(ts, np.sqrt(ab), np.sqrt(1.0 - ab))


def flow_schedule(steps: int, shift: float, num_train_steps: int) -> Schedule:
    """flow: levels t_i = shift((i + 1) / K), i = 0..K-1 (t = 1 first), ending at 0."""
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    t = diffusion.shift_flow_time(np.arange(1, steps + 1, dtype=np.float64) / steps, shift)
    return _schedule(t * (num_train_steps - 1), 1.0 - t, t)


def schedule_for(process: diffusion.NoiseProcess, steps: int) -> Schedule:
    if process.process == "flow":
        return flow_schedule(steps, process.shift, process.num_train_steps)
    return respaced_schedule(process.alpha_bar, steps)


def denoised(pred, x_t, a, s, prediction: str, process: str, clip: float | None = None):
    """(x0, eps) of the model output, x0 clipped to [-clip, clip] with eps kept
    consistent with it (x_t = a x0 + s eps still holds)."""
    x0, eps = diffusion.to_x0_eps(pred, x_t, a, s, prediction, process)
    if clip is not None:
        x0 = jnp.clip(x0, -clip, clip)
        eps = (x_t - a * x0) / s
    return x0, eps


def ddpm_posterior(x0, x_t, alpha_bar, alpha_bar_prev):
    """Mean and variance of q(x_prev | x_t, x0) for the (respaced) step."""
    beta = 1.0 - alpha_bar / alpha_bar_prev
    denom = 1.0 - alpha_bar
    mean = (beta * jnp.sqrt(alpha_bar_prev) / denom) * x0 \
        + ((1.0 - alpha_bar_prev) * jnp.sqrt(1.0 - beta) / denom) * x_t
    var = beta * (1.0 - alpha_bar_prev) / denom  # 0 at the last step: no noise added
    return mean, var


def ddpm_step(x_t, x0, alpha_bar, alpha_bar_prev, noise):
    """Ancestral step with the posterior ("small") variance."""
    mean, var = ddpm_posterior(x0, x_t, alpha_bar, alpha_bar_prev)
    return mean + jnp.sqrt(var) * noise


def ddim_step(x0, eps, alpha_bar, alpha_bar_prev, noise, eta: float = 0.0):
    """Song et al. (2021); eta = 0 is deterministic, eta = 1 matches DDPM's variance."""
    var = eta ** 2 * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev)
    direction = jnp.sqrt(jnp.maximum(1.0 - alpha_bar_prev - var, 0.0)) * eps
    return jnp.sqrt(alpha_bar_prev) * x0 + direction + jnp.sqrt(var) * noise


def euler_step(x_t, velocity, t, t_prev):
    """x at t_prev = x_t + (t_prev - t) v for dx/dt = v (t decreasing)."""
    return x_t + (t_prev - t) * velocity


def sampler_step(name: str, schedule: Schedule, i, x_t, x0, eps, noise):
    """One first-order step i of sampler `name` (static) from x_t with its (x0, eps);
    i may be traced. Heun's correction is steps.diffusion_step's second model call."""
    a, s = schedule.signal[i], schedule.noise[i]
    a_prev, s_prev = schedule.signal_prev[i], schedule.noise_prev[i]
    if name == "ddpm":
        return ddpm_step(x_t, x0, a * a, a_prev * a_prev, noise)
    if name == "ddim":
        return ddim_step(x0, eps, a * a, a_prev * a_prev, noise)
    if name in ("euler", "heun"):
        return euler_step(x_t, eps - x0, s, s_prev)
    raise ValueError(f"unknown sampler {name!r}; choose from {SAMPLERS}")


def heun_correction(x_t, velocity, velocity_at_euler, schedule: Schedule, i):
    """Trapezoid step from x_t with the mean of the velocities at both ends."""
    return euler_step(x_t, 0.5 * (velocity + velocity_at_euler), schedule.noise[i],
                      schedule.noise_prev[i])


def guide(pred_cond, pred_uncond, scale):
    """Classifier-free guidance u + s (c - u), on the model output (or on logits),
    written as c + (s - 1)(c - u) so that s = 1 returns c exactly, bit for bit."""
    return pred_cond + (scale - 1.0) * (pred_cond - pred_uncond)
