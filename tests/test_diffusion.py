"""Noise schedule and forward noising against closed forms."""
import jax
import jax.numpy as jnp
import numpy as np

from tfusion import diffusion


def test_cosine_alpha_bar_matches_closed_form():
    t = 1000
    ab = diffusion.alphas_cumprod(diffusion.cosine_betas(t))
    f = lambda x: np.cos((x / t + 0.008) / 1.008 * np.pi / 2) ** 2
    want = f(np.arange(1, t + 1)) / f(0)
    # The beta clip at 0.999 only bites at the very last steps.
    np.testing.assert_allclose(ab[:-5], want[:-5], rtol=1e-9)
    assert ab[0] > 0.999 and ab[-1] < 1e-4 and (np.diff(ab) < 0).all()


def test_q_sample_is_the_ddpm_marginal():
    ab = diffusion.alphas_cumprod(diffusion.cosine_betas(1000))
    x0 = jnp.full((4000, 1, 2, 2, 1), 0.7)
    t = jnp.full((4000, 1), 500, jnp.int32)
    noise = jax.random.normal(jax.random.key(0), x0.shape)
    xt = np.asarray(diffusion.q_sample(x0, t, noise, ab))
    assert abs(xt.mean() - np.sqrt(ab[500]) * 0.7) < 0.02
    assert abs(xt.std() - np.sqrt(1 - ab[500])) < 0.02


def test_timesteps_uniform_up_to_each_images_cap():
    t_max = jnp.asarray([[999, 500, 0]] * 20000, jnp.int32)
    t = np.asarray(diffusion.sample_timesteps(jax.random.key(1), t_max))
    assert t[:, 0].max() == 999 and t[:, 0].min() == 0
    assert t[:, 1].max() == 500 and t[:, 1].min() == 0
    assert (t[:, 2] == 0).all()
    # Uniform: each decile of [0, 500] holds ~10%.
    hist = np.histogram(t[:, 1], bins=10, range=(0, 501))[0] / len(t)
    assert np.abs(hist - 0.1).max() < 0.015
