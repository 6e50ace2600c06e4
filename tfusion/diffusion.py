"""The noising process (training side) and the exact conversions between predictions.

Every process here is Gaussian: x_t = a(t) x0 + s(t) eps, with a signal
coefficient a and a noise coefficient s per image.

  * process "ddpm" (the paper): integer t in [0, T-1], a = sqrt(alpha_bar[t]),
    s = sqrt(1 - alpha_bar[t]); alpha_bar[t] is the signal fraction after t + 1
    noising steps (Ho et al., Nichol & Dhariwal), so t = 0 is slightly noisy.
  * process "flow" (rectified flow, SD3 / Liu et al.): continuous t in [0, 1],
    a = 1 - t, s = t; the natural target is the velocity dx_t/dt = eps - x0.

The model's output means `diffusion.prediction`:
  eps  the noise;
  x0   the clean latent;
  v    ddpm: a eps - s x0 (Salimans & Ho 2022); flow: the velocity eps - x0.
to_x0_eps / target_of convert exactly, so the loss, every sampler, CFG and the
x0 clip work for any prediction.

The model's timestep input is a float on one scale for both processes: the ddpm
index t, or the flow time t * (T - 1).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from tfusion.config import PREDICTIONS, DiffusionConfig


# --- ddpm noise schedules ---

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


def shift_alpha_bar(alpha_bar: np.ndarray, shift: float) -> np.ndarray:
    """Hoogeboom et al. (2023): log SNR(t) -> log SNR(t) - 2 log(shift).

    shift > 1 puts more of the steps at high noise (large images); shift < 1 at
    low noise; alpha_bar = sigmoid(log SNR)."""
    if shift == 1.0:
        return np.asarray(alpha_bar, np.float64)
    log_snr = np.log(alpha_bar) - np.log1p(-alpha_bar) - 2.0 * math.log(shift)
    return 1.0 / (1.0 + np.exp(-log_snr))


def shift_flow_time(t, shift: float):
    """The same log-SNR shift for rectified flow: t -> shift t / (1 + (shift - 1) t)
    (SD3's time shift; (1 - t)/t, the flow's sqrt SNR, is divided by shift)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def make_alpha_bar(diffusion_cfg) -> np.ndarray:
    """The ddpm schedule after the log-SNR shift: float64 [T]."""
    return shift_alpha_bar(alphas_cumprod(make_betas(diffusion_cfg)),
                           float(diffusion_cfg.schedule_shift))


# --- exact conversions between what the model may predict ---

def to_x0_eps(pred, x_t, a, s, prediction: str, process: str):
    """(x0, eps) implied by the model output `pred` at x_t = a x0 + s eps."""
    if prediction == "eps":
        return (x_t - s * pred) / a, pred
    if prediction == "x0":
        return pred, (x_t - a * pred) / s
    if prediction != "v":
        raise ValueError(f"unknown prediction {prediction!r}; choose from {PREDICTIONS}")
    if process == "flow":  # v = eps - x0 and x_t = (1 - t) x0 + t eps with a + s = 1
        return x_t - s * pred, x_t + a * pred
    # ddpm (a^2 + s^2 = 1): v = a eps - s x0
    return a * x_t - s * pred, s * x_t + a * pred


def target_of(x0, eps, a, s, prediction: str, process: str):
    """What a perfect model outputs for (x0, eps): the regression target."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if process == "flow":
        return eps - x0
    return a * eps - s * x0


def x0_error_factor(a, s, prediction: str):
    """c^2 with |x0 error| = c |prediction error| (from to_x0_eps)."""
    if prediction == "eps":
        return jnp.square(s / a)
    if prediction == "x0":
        return jnp.ones_like(a)
    return jnp.square(s)  # v, both processes


def min_snr_weight(a, s, prediction: str, gamma: float):
    """Hang et al. (2023): weight the x0-space loss by min(SNR, gamma), written in the
    prediction's own space (eps: min(SNR, g)/SNR; v: min(SNR, g)/(SNR + 1) for ddpm)."""
    snr = jnp.square(a) / jnp.maximum(jnp.square(s), 1e-20)
    if prediction == "eps":  # min(snr, g) * s^2 / a^2 = min(snr, g) / snr; 1 where snr -> 0
        return jnp.where(snr > 0, jnp.minimum(snr, gamma) / jnp.maximum(snr, 1e-20), 1.0)
    return jnp.minimum(snr, gamma) * x0_error_factor(a, s, prediction)


def broadcast_to_latents(v, x):
    """Per-image values [B, M] against latents [B, M, H, W, C]."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


@dataclasses.dataclass(frozen=True)
class NoiseDraw:
    """One noising of a batch's image slots: what the model sees and what it must output."""

    noisy: jax.Array  # x_t [B, M, H, W, C]
    model_t: jax.Array  # float32 [B, M]: the model's timestep input
    target: jax.Array  # regression target [B, M, H, W, C]
    weight: jax.Array  # float32 [B, M]: per-image loss weight (1 when unweighted)


jax.tree_util.register_dataclass(NoiseDraw, data_fields=["noisy", "model_t", "target", "weight"],
                                 meta_fields=[])


class NoiseProcess:
    """The configured process: schedule, time sampling, target and loss weighting.

    Built once from config.diffusion and shared by the objective, held-out
    evaluation and the samplers' schedules.
    """

    def __init__(self, diffusion_cfg):
        """diffusion_cfg: a DiffusionConfig or the config.diffusion section (validated)."""
        d = DiffusionConfig.of(diffusion_cfg)
        self.process = d.process
        self.prediction = d.prediction
        self.num_train_steps = int(d.num_train_steps)
        self.shift = float(d.schedule_shift)
        self.timestep_sampling = d.timestep_sampling
        self.logit_mean = float(d.logit_normal_mean)
        self.logit_std = float(d.logit_normal_std)
        self.loss_weighting = d.loss_weighting
        self.min_snr_gamma = float(d.min_snr_gamma)
        self.alpha_bar = make_alpha_bar(d) if self.process == "ddpm" else None

    # --- time ---

    def _unit_draw(self, rng, shape):
        """u in [0, 1) per image: uniform, or logit-normal (SD3) concentrated mid-range."""
        if self.timestep_sampling == "logit_normal":
            n = jax.random.normal(rng, shape, jnp.float32)
            return jnp.minimum(jax.nn.sigmoid(self.logit_mean + self.logit_std * n),
                               1.0 - 1e-7)
        return jax.random.uniform(rng, shape, jnp.float32)

    def times_from_unit(self, u, t_max):
        """u in [0, 1) -> the process's time, limited by t_max (int ddpm steps [B, M]).

        ddpm: integer t = floor(u (t_max + 1)) in [0, t_max].
        flow: t = shift(u * t_max / (T - 1)), so noise limiting keeps the same
        fraction of the time axis as for ddpm."""
        if self.process == "ddpm":
            return jnp.minimum(jnp.floor(u * (t_max + 1)).astype(jnp.int32), t_max)
        frac = t_max.astype(jnp.float32) / (self.num_train_steps - 1)
        return shift_flow_time(u * frac, self.shift)

    def coefficients(self, times):
        """(a, s) float32, same shape as times."""
        if self.process == "ddpm":
            ab = jnp.asarray(self.alpha_bar, jnp.float32)[times]
            return jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
        t = times.astype(jnp.float32)
        return 1.0 - t, t

    def model_time(self, times):
        if self.process == "ddpm":
            return times.astype(jnp.float32)
        return times.astype(jnp.float32) * (self.num_train_steps - 1)

    # --- training ---

    def loss_weight(self, a, s):
        if self.loss_weighting == "min_snr":
            return min_snr_weight(a, s, self.prediction, self.min_snr_gamma)
        return jnp.ones_like(a)

    def at(self, x0, times, noise, clean=None) -> NoiseDraw:
        """The noising of x0 [B, M, H, W, C] at given times [B, M] with given noise.

        `clean` (bool [B, M]): slots read as given at model time 0, what generation's
        cache holds for an image in a prompt, with loss weight 0: condition images
        (tfusion.batch.CONDITION; the loss also leaves them out of its count,
        losses.diffusion_targets), or every slot for clean-image evaluation."""
        a, s = self.coefficients(times)
        ab, sb = broadcast_to_latents(a, x0), broadcast_to_latents(s, x0)
        noisy = ab * x0 + sb * noise
        target = target_of(x0, noise, ab, sb, self.prediction, self.process)
        model_t, weight = self.model_time(times), self.loss_weight(a, s)
        if clean is not None:
            noisy = jnp.where(broadcast_to_latents(clean, x0), x0, noisy)
            model_t = jnp.where(clean, 0.0, model_t)
            weight = jnp.where(clean, 0.0, weight)
        return NoiseDraw(noisy, model_t, target, weight)

    def draw(self, rng, images, t_max) -> NoiseDraw:
        """Draws a time and the noise per image slot: images [B, M, H, W, C], t_max [B, M];
        condition slots (t_max < 0) stay clean (`at`'s clean)."""
        t_rng, n_rng = jax.random.split(rng)
        times = self.times_from_unit(self._unit_draw(t_rng, t_max.shape),
                                     jnp.maximum(t_max, 0))
        noise = jax.random.normal(n_rng, images.shape, jnp.float32)
        return self.at(images, times, noise, clean=t_max < 0)

    def x0_eps(self, pred, x_t, times):
        """(x0, eps) from the model output at x_t of the given times [B, M]."""
        a, s = self.coefficients(times)
        return to_x0_eps(pred, x_t, broadcast_to_latents(a, x_t), broadcast_to_latents(s, x_t),
                         self.prediction, self.process)

    def bucket_times(self, fractions):
        """Times at fractions of the time axis (fixed-t evaluation), as a [K] array."""
        f = np.asarray(fractions, np.float64)
        if self.process == "ddpm":
            return jnp.asarray(np.round(f * (self.num_train_steps - 1)).astype(np.int32))
        return jnp.asarray(shift_flow_time(f, self.shift), jnp.float32)

    def log_snr(self, times) -> np.ndarray:
        a, s = self.coefficients(jnp.asarray(times))
        a, s = np.asarray(a, np.float64), np.asarray(s, np.float64)
        with np.errstate(divide="ignore"):
            return 2.0 * (np.log(a) - np.log(s))
