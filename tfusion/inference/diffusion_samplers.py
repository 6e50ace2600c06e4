"""Diffusion samplers on a K-step schedule, for any prediction, plus CFG.

ddpm process: K levels among the T training steps (alpha_bar_i = alpha_bar[t_i],
the model called with t_i), treated as a K-step chain (Nichol & Dhariwal respacing).
Spacings: "linspace" (evenly, both ends: the paper's), "trailing" (every T/K-th step
counted back from T - 1; Lin et al. 2024, what few-step samplers use) and "logsnr"
(uniform in log SNR, continuous t). Samplers "ddpm" (ancestral), "ddim" (eta = 0),
"dpmpp_2m".

flow process: K + 1 times from 1 to 0, evenly spaced then shifted like training
times (diffusion.shift_flow_time). Samplers "euler", "heun" (Karras et al. 2022:
Euler, then the trapezoid with the velocity at the Euler point; plain Euler on the
last step, which ends at t = 0) and "dpmpp_2m".

"dpmpp_2m" is DPM-Solver++(2M) (Lu et al. 2022, data prediction, multistep): with
lambda = log(a / s) and h = lambda_prev - lambda, the first-order step is
    x_prev = (s_prev / s) x - a_prev (e^-h - 1) D,
exact for a locally constant x0 estimate D (it is DDIM); the 2M step takes
D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i+1} with r = h_last / h, a linear extrapolation
of the x0 estimates in lambda from this step's and the previous step's. The first step
(no history) and the last (to s = 0, where h is infinite) are first order. Written
for any Gaussian path x = a x0 + s eps, so it samples both processes.

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
from tfusion.config import SAMPLERS_BY_PROCESS, SPACINGS_BY_PROCESS  # noqa: F401 (re-exported)

SAMPLERS = tuple(dict.fromkeys(SAMPLERS_BY_PROCESS["ddpm"] + SAMPLERS_BY_PROCESS["flow"]))
SPACINGS = tuple(dict.fromkeys(SPACINGS_BY_PROCESS["ddpm"] + SPACINGS_BY_PROCESS["flow"]))


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerState:
    """What a sampler carries from step to step: the latents at the current level and
    the previous step's x0 estimate (used by the multistep "dpmpp_2m"; zeros before
    the first step)."""

    x: jax.Array  # [B, H, W, C]
    x0_last: jax.Array

    @classmethod
    def start(cls, x) -> "SamplerState":
        return cls(x, jnp.zeros_like(x))


def respaced_timesteps(num_train_steps: int, steps: int, spacing: str = "linspace"
                       ) -> np.ndarray:
    """`steps` of the training steps 0..T-1, ascending. "linspace": evenly from 0 to
    T-1, both ends included; "trailing": T-1, T-1-T/K, ... (down to T/K - 1)."""
    if not 0 < steps <= num_train_steps:
        raise ValueError(f"steps must be in (0, {num_train_steps}], got {steps}")
    if spacing == "trailing":
        ts = np.round(np.arange(num_train_steps, 0, -num_train_steps / steps)) - 1
        return np.unique(ts).astype(np.int32)
    if spacing != "linspace":
        raise ValueError(f"spacing {spacing!r} has no integer timesteps; choose "
                         "'linspace' or 'trailing'")
    if steps == 1:
        return np.asarray([num_train_steps - 1], np.int32)
    return np.unique(np.round(np.linspace(0, num_train_steps - 1, steps))).astype(np.int32)


def _schedule(model_time, signal, noise, clean_model_time=0.0) -> Schedule:
    f32 = lambda a: jnp.asarray(np.asarray(a, np.float64), jnp.float32)
    prev = lambda a, first: np.concatenate([[first], np.asarray(a, np.float64)[:-1]])
    return Schedule(f32(model_time), f32(signal), f32(noise), f32(prev(signal, 1.0)),
                    f32(prev(noise, 0.0)), f32(prev(model_time, clean_model_time)))


def respaced_schedule(alpha_bar: np.ndarray, steps: int, spacing: str = "linspace"
                      ) -> Schedule:
    """ddpm: K levels of `alpha_bar` (already shifted, if configured)."""
    alpha_bar = np.asarray(alpha_bar, np.float64)
    if spacing == "logsnr":
        return logsnr_schedule(alpha_bar, steps)
    ts = respaced_timesteps(len(alpha_bar), steps, spacing)
    ab = alpha_bar[ts]
    return _schedule(ts, np.sqrt(ab), np.sqrt(1.0 - ab))


def logsnr_schedule(alpha_bar: np.ndarray, steps: int) -> Schedule:
    """ddpm: K levels uniform in log SNR from t = T-1 to t = 0 (both ends). A level
    between training steps gets the continuous time t whose log SNR, linear between
    the neighbouring steps', is the level's; its (a, s) come from the log SNR itself."""
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    log_snr = np.log(alpha_bar) - np.log1p(-alpha_bar)  # decreasing in t
    levels = np.linspace(log_snr[0], log_snr[-1], steps) if steps > 1 else log_snr[-1:]
    t = np.interp(-levels, -log_snr, np.arange(len(alpha_bar), dtype=np.float64))
    ab = 1.0 / (1.0 + np.exp(-levels))
    return _schedule(t, np.sqrt(ab), np.sqrt(1.0 - ab))


def flow_schedule(steps: int, shift: float, num_train_steps: int) -> Schedule:
    """flow: levels t_i = shift((i + 1) / K), i = 0..K-1 (t = 1 first), ending at 0."""
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    t = diffusion.shift_flow_time(np.arange(1, steps + 1, dtype=np.float64) / steps, shift)
    return _schedule(t * (num_train_steps - 1), 1.0 - t, t)


def schedule_for(process: diffusion.NoiseProcess, steps: int, spacing: str = "linspace"
                 ) -> Schedule:
    allowed = SPACINGS_BY_PROCESS[process.process]
    if spacing not in allowed:
        raise ValueError(f"spacing {spacing!r} does not apply to the {process.process!r} "
                         f"process; choose from {allowed}")
    if process.process == "flow":
        return flow_schedule(steps, process.shift, process.num_train_steps)
    return respaced_schedule(process.alpha_bar, steps, spacing)


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


def dpmpp_step(x_t, denoised, a, s, a_prev, s_prev):
    """DPM-Solver++ first-order update with the x0 estimate `denoised`:
    x_prev = (s_prev / s) x_t + a_prev (1 - e^-h) denoised, where
    e^-h = (s_prev a) / (s a_prev). Written with ratios, not lambdas, so that a = 0
    (flow at t = 1) and s_prev = 0 (the last step) are exact, not inf - inf."""
    decay = (s_prev * a) / (s * a_prev)  # e^-h
    return (s_prev / s) * x_t + a_prev * (1.0 - decay) * denoised


def dpmpp_2m_denoised(schedule: Schedule, i, x0, x0_last):
    """The 2M step's D at step i from this step's x0 and the previous step's (level
    i + 1); first order (x0) on the first step (i = K - 1) and the last (i = 0)."""
    k = schedule.num_steps
    log_snr = lambda a, s: jnp.log(a) - jnp.log(s)
    lam = log_snr(schedule.signal[i], schedule.noise[i])
    lam_prev = log_snr(schedule.signal_prev[i], schedule.noise_prev[i])
    up = jnp.minimum(i + 1, k - 1)
    lam_last = log_snr(schedule.signal[up], schedule.noise[up])
    r = (lam - lam_last) / (lam_prev - lam)  # h_last / h
    second = x0 + (0.5 / r) * (x0 - x0_last)
    return jnp.where((i > 0) & (i < k - 1), second, x0)


def sampler_step(name: str, schedule: Schedule, i, x_t, x0, eps, noise, x0_last=None):
    """One step i of sampler `name` (static) from x_t with its (x0, eps); i may be
    traced. x0_last: the previous step's x0 (multistep "dpmpp_2m" only). Heun's
    correction is steps.diffusion_step's second model call."""
    a, s = schedule.signal[i], schedule.noise[i]
    a_prev, s_prev = schedule.signal_prev[i], schedule.noise_prev[i]
    if name == "ddpm":
        return ddpm_step(x_t, x0, a * a, a_prev * a_prev, noise)
    if name == "ddim":
        return ddim_step(x0, eps, a * a, a_prev * a_prev, noise)
    if name in ("euler", "heun"):
        return euler_step(x_t, eps - x0, s, s_prev)
    if name == "dpmpp_2m":
        return dpmpp_step(x_t, dpmpp_2m_denoised(schedule, i, x0, x0_last), a, s, a_prev,
                          s_prev)
    raise ValueError(f"unknown sampler {name!r}; choose from {SAMPLERS}")


def guided_steps(schedule: Schedule, interval) -> np.ndarray:
    """bool [K]: whether step i applies CFG, i.e. its level's noise s_i lies in
    interval = (lo, hi) (Kynkaanniemi et al. 2024). s falls with i, so the guided steps
    are one contiguous run."""
    lo, hi = interval
    s = np.asarray(schedule.noise, np.float64)
    return (s >= lo) & (s <= hi)


def heun_correction(x_t, velocity, velocity_at_euler, schedule: Schedule, i):
    """Trapezoid step from x_t with the mean of the velocities at both ends."""
    return euler_step(x_t, 0.5 * (velocity + velocity_at_euler), schedule.noise[i],
                      schedule.noise_prev[i])


def guide(pred_cond, pred_uncond, scale):
    """Classifier-free guidance u + s (c - u), on the model output (or on logits),
    written as c + (s - 1)(c - u) so that s = 1 returns c exactly, bit for bit."""
    return pred_cond + (scale - 1.0) * (pred_cond - pred_uncond)
