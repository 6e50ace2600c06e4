"""Samplers against an independent numpy derivation, and token filters."""
import jax
import jax.numpy as jnp
import numpy as np

from tfusion import diffusion
from tfusion.inference import samplers
from tfusion.inference.sampling import filter_top_k, filter_top_p, sample_tokens


def _posterior_by_bayes(x0, x_t, ab_t, ab_prev):
    """q(x_prev | x_t, x0) from Gaussian conditioning, not the closed-form coefficients:
    prior x_prev ~ N(sqrt(ab_prev) x0, 1 - ab_prev), likelihood x_t ~ N(sqrt(a) x_prev, 1 - a)
    with a = ab_t / ab_prev; posterior precision and mean by completing the square."""
    a = ab_t / ab_prev
    precision = 1.0 / (1.0 - ab_prev) + a / (1.0 - a)
    var = 1.0 / precision
    mean = var * (np.sqrt(ab_prev) * x0 / (1.0 - ab_prev) + np.sqrt(a) * x_t / (1.0 - a))
    return mean, var


def test_respaced_schedule():
    ab = diffusion.alphas_cumprod(diffusion.cosine_betas(1000))
    sched = samplers.respaced_schedule(ab, 250)
    ts = np.asarray(sched.timesteps)
    assert len(ts) == 250 and ts[0] == 0 and ts[-1] == 999 and (np.diff(ts) > 0).all()
    np.testing.assert_allclose(np.asarray(sched.alpha_bar), ab[ts], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sched.alpha_bar_prev)[1:], ab[ts[:-1]], rtol=1e-6)
    assert float(sched.alpha_bar_prev[0]) == 1.0
    full = samplers.respaced_schedule(ab, 1000)
    np.testing.assert_array_equal(np.asarray(full.timesteps), np.arange(1000))


def test_ddpm_step_matches_numpy_posterior():
    ab = diffusion.alphas_cumprod(diffusion.cosine_betas(1000))
    sched = samplers.respaced_schedule(ab, 50)
    rng = np.random.default_rng(0)
    x0_true = rng.normal(size=(2, 4, 4, 3))
    eps = rng.normal(size=x0_true.shape)
    noise = rng.normal(size=x0_true.shape)
    for i in (49, 30, 1, 0):
        t = int(sched.timesteps[i])
        ab_t = ab[t]
        ab_prev = ab[int(sched.timesteps[i - 1])] if i > 0 else 1.0
        x_t = np.sqrt(ab_t) * x0_true + np.sqrt(1 - ab_t) * eps
        x0_hat = (x_t - np.sqrt(1 - ab_t) * eps) / np.sqrt(ab_t)
        if i > 0:
            mean, var = _posterior_by_bayes(x0_hat, x_t, ab_t, ab_prev)
        else:  # the last step lands on the clean image: no noise
            mean, var = x0_hat, 0.0
        expected = mean + np.sqrt(var) * noise
        got = samplers.sampler_step("ddpm", sched, i, jnp.asarray(x_t, jnp.float32),
                                    jnp.asarray(eps, jnp.float32), jnp.asarray(noise, jnp.float32))
        np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-4, atol=2e-4)
        m, v = samplers.ddpm_posterior(jnp.asarray(x0_hat), jnp.asarray(x_t), ab_t, ab_prev)
        np.testing.assert_allclose(float(v), var, rtol=1e-5, atol=1e-12)


def test_ddim_recovers_x0_with_true_eps():
    """With the true epsilon, deterministic DDIM lands exactly on x0 after any path."""
    ab = diffusion.alphas_cumprod(diffusion.cosine_betas(1000))
    sched = samplers.respaced_schedule(ab, 10)
    rng = np.random.default_rng(1)
    x0, eps = rng.normal(size=(3, 8)), rng.normal(size=(3, 8))
    x = jnp.asarray(np.sqrt(ab[999]) * x0 + np.sqrt(1 - ab[999]) * eps, jnp.float32)
    for i in reversed(range(sched.num_steps)):
        x = samplers.sampler_step("ddim", sched, i, x, jnp.asarray(eps, jnp.float32),
                                  jnp.zeros_like(x))
    np.testing.assert_allclose(np.asarray(x), x0, atol=1e-2)  # float32 at alpha_bar ~ 0


def test_guidance_formula():
    c, u = jnp.asarray([1.0, 2.0]), jnp.asarray([0.5, -1.0])
    np.testing.assert_allclose(np.asarray(samplers.guide(c, u, 1.0)), c)
    np.testing.assert_allclose(np.asarray(samplers.guide(c, u, 3.0)), [2.0, 8.0])


def test_token_filters():
    logits = jnp.asarray([[0.0, 3.0, 1.0, 2.0, -1.0]])
    kept = np.asarray(filter_top_k(logits, 2)) > -1e29
    np.testing.assert_array_equal(kept, [[False, True, False, True, False]])
    probs = np.asarray(jax.nn.softmax(logits))[0]  # .64 .24 .09 .03 .01 for 3,2,1,0,-1
    kept = np.asarray(filter_top_p(logits, 0.8)) > -1e29
    np.testing.assert_array_equal(kept, [[False, True, False, True, False]])
    assert probs[1] < 0.8 < probs[1] + probs[3]
    keys = jax.vmap(jax.random.key)(jnp.arange(1))
    greedy = sample_tokens(logits, keys, temperature=0.0)
    assert int(greedy[0]) == 1
    banned = jnp.zeros((1, 5), bool).at[0, 1].set(True)
    assert int(sample_tokens(logits, keys, temperature=0.0, banned=banned)[0]) == 3
    draws = [int(sample_tokens(logits, jax.vmap(jax.random.key)(jnp.asarray([s])),
                               temperature=1.0, top_k=2)[0]) for s in range(20)]
    assert set(draws) <= {1, 3} and len(set(draws)) == 2
