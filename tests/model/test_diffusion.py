"""Noise schedule and forward noising against closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfusion import diffusion


def test_cosine_alpha_bar_matches_closed_form():
    t = 1000
    ab = diffusion.alphas_cumprod(diffusion.cosine_betas(t))
    f = lambda x: np.cos((x / t + 0.008) / 1.008 * np.pi / 2) ** 2
    want = f(np.arange(1, t + 1)) / f(0)
    # The beta clip at 0.999 only bites at the very last steps.
    np.testing.assert_allclose(ab[:-5], want[:-5], rtol=1e-9)
    assert ab[0] > 0.999 and ab[-1] < 1e-4 and (np.diff(ab) < 0).all()


def test_ddpm_noising_is_the_ddpm_marginal():
    ab = diffusion.alphas_cumprod(diffusion.cosine_betas(1000))
    x0 = jnp.full((4000, 1, 2, 2, 1), 0.7)
    t = jnp.full((4000, 1), 500, jnp.int32)
    noise = jax.random.normal(jax.random.key(0), x0.shape)
    xt = np.asarray(_process().at(x0, t, noise).noisy)
    assert abs(xt.mean() - np.sqrt(ab[500]) * 0.7) < 0.02
    assert abs(xt.std() - np.sqrt(1 - ab[500])) < 0.02


def test_timesteps_uniform_up_to_each_images_cap():
    t_max = jnp.asarray([[999, 500, 0]] * 20000, jnp.int32)
    u = jax.random.uniform(jax.random.key(1), t_max.shape)
    t = np.asarray(_process().times_from_unit(u, t_max))
    assert t[:, 0].max() == 999 and t[:, 0].min() == 0
    assert t[:, 1].max() == 500 and t[:, 1].min() == 0
    assert (t[:, 2] == 0).all()
    # Uniform: each decile of [0, 500] holds ~10%.
    hist = np.histogram(t[:, 1], bins=10, range=(0, 501))[0] / len(t)
    assert np.abs(hist - 0.1).max() < 0.015


# --- predictions, processes, weighting, time sampling (numpy references) ---

def _numpy_coefficients(process, t, alpha_bar=None):
    if process == "ddpm":
        return np.sqrt(alpha_bar[t]), np.sqrt(1 - alpha_bar[t])
    return 1.0 - t, t


def _numpy_target(prediction, process, x0, eps, a, s):
    """Written from the definitions: eps, x0, v = a eps - s x0 (ddpm), v = dx_t/dt (flow)."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if process == "ddpm":
        return a * eps - s * x0
    return eps - x0  # d/dt [(1 - t) x0 + t eps]


@pytest.mark.parametrize("process", ["ddpm", "flow"])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_prediction_conversions_invert_the_targets(process, prediction):
    rng = np.random.default_rng(0)
    ab = diffusion.alphas_cumprod(diffusion.cosine_betas(1000))
    t = np.asarray([3, 250, 700, 990]) if process == "ddpm" else np.asarray([0.02, 0.3, 0.7, 0.97])
    a, s = _numpy_coefficients(process, t, ab)
    a, s = a[:, None], s[:, None]
    x0, eps = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    x_t = a * x0 + s * eps
    target = _numpy_target(prediction, process, x0, eps, a, s)
    np.testing.assert_allclose(
        np.asarray(diffusion.target_of(x0, eps, a, s, prediction, process)), target, rtol=1e-12)
    got_x0, got_eps = diffusion.to_x0_eps(target, x_t, a, s, prediction, process)
    np.testing.assert_allclose(np.asarray(got_x0), x0, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(np.asarray(got_eps), eps, rtol=1e-6, atol=1e-8)
    # The x0 error factor: a prediction error d moves x0 by c * d.
    delta = rng.normal(size=(4, 6)) * 1e-3
    moved, _ = diffusion.to_x0_eps(target + delta, x_t, a, s, prediction, process)
    c2 = np.asarray(diffusion.x0_error_factor(jnp.asarray(a), jnp.asarray(s), prediction))
    np.testing.assert_allclose(np.square(np.asarray(moved) - x0), c2 * delta ** 2, rtol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_min_snr_weight_matches_hang_et_al(prediction):
    ab = diffusion.alphas_cumprod(diffusion.cosine_betas(1000))
    t = np.arange(0, 1000, 37)
    a, s = np.sqrt(ab[t]), np.sqrt(1 - ab[t])
    snr = ab[t] / (1 - ab[t])
    # The paper's table: eps min(snr, g)/snr; v min(snr, g)/(snr + 1); x0 min(snr, g).
    want = {"eps": np.minimum(snr, 5.0) / snr, "v": np.minimum(snr, 5.0) / (snr + 1),
            "x0": np.minimum(snr, 5.0)}[prediction]
    got = diffusion.min_snr_weight(jnp.asarray(a, jnp.float32), jnp.asarray(s, jnp.float32),
                                   prediction, 5.0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)


def _process(**fields):
    from tfusion.config import diffusion_config
    c = diffusion_config()
    c.update(fields)
    return diffusion.NoiseProcess(c)


def test_flow_draw_matches_numpy_and_limits_noise():
    p = _process(process="flow", prediction="v", sampler="euler")
    images = jax.random.normal(jax.random.key(0), (4000, 2, 2, 2, 1))
    t_max = jnp.asarray([[999, 500]] * 4000, jnp.int32)
    draw = p.draw(jax.random.key(1), images, t_max)
    t = np.asarray(draw.model_t) / 999.0
    assert t[:, 0].max() > 0.99 and t[:, 1].max() <= 500 / 999 + 1e-6
    # Recover the noise from x_t and check x_t and the velocity target against numpy.
    x0 = np.asarray(images)
    tb = t[..., None, None, None]
    eps = (np.asarray(draw.noisy) - (1 - tb) * x0) / np.maximum(tb, 1e-6)
    ok = t > 1e-3
    np.testing.assert_allclose(np.asarray(draw.target)[ok], (eps - x0)[ok], rtol=1e-3, atol=1e-3)
    assert abs(eps[ok].std() - 1.0) < 0.02  # the recovered noise is standard normal


def test_logit_normal_times_and_shift():
    p = _process(process="flow", prediction="v", sampler="euler",
                 timestep_sampling="logit_normal", logit_normal_mean=0.5, logit_normal_std=0.8)
    u = np.asarray(p._unit_draw(jax.random.key(2), (50000,)))
    logit = np.log(u) - np.log1p(-u)
    assert abs(logit.mean() - 0.5) < 0.02 and abs(logit.std() - 0.8) < 0.02
    # Shift = log-SNR shift by -2 log(shift): ddpm alpha_bar and flow time agree.
    ab = diffusion.alphas_cumprod(diffusion.cosine_betas(1000))
    shifted = diffusion.shift_alpha_bar(ab[:-1], 3.0)
    np.testing.assert_allclose(np.log(shifted / (1 - shifted)),
                               np.log(ab[:-1] / (1 - ab[:-1])) - 2 * np.log(3.0), rtol=1e-9,
                               atol=1e-9)
    t = np.linspace(0.01, 0.99, 7)
    ts = diffusion.shift_flow_time(t, 3.0)
    np.testing.assert_allclose(2 * np.log((1 - ts) / ts), 2 * np.log((1 - t) / t) - 2 * np.log(3.0),
                               rtol=1e-9)


def test_paper_configs_keep_the_paper_recipe():
    """DDPM, epsilon, cosine, uniform t, unweighted MSE, no shift; for every paper config
    and ablation in the registry (tiny experiments may choose otherwise)."""
    from experiments import registry
    paper = [n for n in registry.EXPERIMENTS if n.startswith(("transfusion_", "chameleon_"))
             or "ablation" in n]
    assert len(paper) >= 5, paper
    for name in paper:
        d = registry.get_config(name).diffusion
        assert (d.process, d.prediction, d.schedule, d.timestep_sampling, d.loss_weighting,
                d.schedule_shift, d.sampler) == ("ddpm", "eps", "cosine", "uniform", "none",
                                                 1.0, "ddpm"), name
        # Sampling: 250 respaced DDPM steps, CFG at every step.
        assert (d.sample_steps, d.sample_spacing, tuple(d.cfg_interval)) == (
            250, "linspace", (0.0, 1.0)), name
