"""Samplers against an independent numpy derivation, and token filters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfusion import diffusion
from tfusion.inference import diffusion_samplers as samplers
from tfusion.inference.token_sampling import filter_top_k, filter_top_p, sample_tokens


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
    ts = np.asarray(sched.model_time).astype(int)
    assert len(ts) == 250 and ts[0] == 0 and ts[-1] == 999 and (np.diff(ts) > 0).all()
    np.testing.assert_allclose(np.asarray(sched.signal) ** 2, ab[ts], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(sched.signal_prev)[1:] ** 2, ab[ts[:-1]], rtol=1e-5)
    assert float(sched.signal_prev[0]) == 1.0 and float(sched.noise_prev[0]) == 0.0
    full = samplers.respaced_schedule(ab, 1000)
    np.testing.assert_array_equal(np.asarray(full.model_time), np.arange(1000))


def _step(name, sched, i, x_t, pred, noise, prediction="eps", process="ddpm", clip=None):
    a, s = sched.signal[i], sched.noise[i]
    x0, eps = samplers.denoised(jnp.asarray(pred, jnp.float32), jnp.asarray(x_t, jnp.float32),
                                a, s, prediction, process, clip)
    return samplers.sampler_step(name, sched, i, jnp.asarray(x_t, jnp.float32), x0, eps,
                                 jnp.asarray(noise, jnp.float32))


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_ddpm_step_matches_numpy_posterior(prediction):
    ab = diffusion.alphas_cumprod(diffusion.cosine_betas(1000))
    sched = samplers.respaced_schedule(ab, 50)
    rng = np.random.default_rng(0)
    x0_true = rng.normal(size=(2, 4, 4, 3))
    eps = rng.normal(size=x0_true.shape)
    noise = rng.normal(size=x0_true.shape)
    for i in (49, 30, 1, 0):
        t = int(sched.model_time[i])
        ab_t = ab[t]
        ab_prev = ab[int(sched.model_time[i - 1])] if i > 0 else 1.0
        x_t = np.sqrt(ab_t) * x0_true + np.sqrt(1 - ab_t) * eps
        x0_hat = (x_t - np.sqrt(1 - ab_t) * eps) / np.sqrt(ab_t)
        if i > 0:
            mean, var = _posterior_by_bayes(x0_hat, x_t, ab_t, ab_prev)
        else:  # the last step lands on the clean image: no noise
            mean, var = x0_hat, 0.0
        expected = mean + np.sqrt(var) * noise
        # The same step from the model output that means eps, v or x0.
        pred = {"eps": eps, "x0": x0_true,
                "v": np.sqrt(ab_t) * eps - np.sqrt(1 - ab_t) * x0_true}[prediction]
        got = _step("ddpm", sched, i, x_t, pred, noise, prediction)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-3, atol=2e-3)
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
        x = _step("ddim", sched, i, x, eps, np.zeros_like(x))
    np.testing.assert_allclose(np.asarray(x), x0, atol=1e-2)  # float32 at alpha_bar ~ 0


def test_x0_clip_keeps_eps_consistent():
    x_t, pred = jnp.asarray([0.9, -3.0]), jnp.asarray([0.1, 0.5])
    x0, eps = samplers.denoised(pred, x_t, 0.6, 0.8, "eps", "ddpm", clip=1.0)
    assert float(jnp.max(jnp.abs(x0))) <= 1.0
    np.testing.assert_allclose(np.asarray(0.6 * x0 + 0.8 * eps), np.asarray(x_t), rtol=1e-6)


def test_flow_schedule_and_euler_heun_steps_match_numpy():
    sched = samplers.flow_schedule(8, 2.0, 1000)
    t = 2.0 * (np.arange(1, 9) / 8) / (1 + (np.arange(1, 9) / 8))  # shift 2
    np.testing.assert_allclose(np.asarray(sched.noise), t, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sched.noise_prev), np.concatenate([[0.0], t[:-1]]),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(sched.model_time), t * 999, rtol=1e-6)
    rng = np.random.default_rng(3)
    x_t, v = rng.normal(size=(2, 5)), rng.normal(size=(2, 5))
    for i in (7, 3, 0):
        want = x_t + (sched.noise_prev[i] - t[i]) * v  # Euler on dx/dt = v
        got = _step("euler", sched, i, x_t, v, np.zeros_like(x_t), "v", "flow")
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    # Heun: the mean of the velocities at both ends of the Euler step.
    v_end = rng.normal(size=(2, 5))
    i = 5
    dt = float(sched.noise_prev[i]) - t[i]
    got = samplers.heun_correction(jnp.asarray(x_t), jnp.asarray(v), jnp.asarray(v_end), sched, i)
    np.testing.assert_allclose(np.asarray(got), x_t + dt * (v + v_end) / 2, rtol=1e-5, atol=1e-6)


def test_flow_sampler_is_exact_on_a_straight_path():
    """With the true velocity eps - x0 (the same at every t), Euler and Heun land on x0."""
    sched = samplers.flow_schedule(5, 3.0, 1000)
    rng = np.random.default_rng(4)
    x0, eps = rng.normal(size=(2, 6)), rng.normal(size=(2, 6))
    x = jnp.asarray(eps, jnp.float32)  # t = 1
    for i in reversed(range(sched.num_steps)):
        x = _step("heun", sched, i, x, eps - x0, np.zeros_like(eps), "v", "flow")
    np.testing.assert_allclose(np.asarray(x), x0, atol=1e-5)


def test_guidance_formula():
    c, u = jnp.asarray([1.0, 2.0]), jnp.asarray([0.5, -1.0])
    np.testing.assert_array_equal(np.asarray(samplers.guide(c, u, 1.0)), c)  # exactly
    np.testing.assert_allclose(np.asarray(samplers.guide(c, u, 3.0)), [2.0, 8.0])


@pytest.mark.parametrize("process,prediction", [("ddpm", "v"), ("ddpm", "x0"), ("flow", "v")])
def test_guiding_the_output_equals_guiding_eps(process, prediction):
    rng = np.random.default_rng(5)
    x_t, pc, pu = (jnp.asarray(rng.normal(size=(4,))) for _ in range(3))
    a, s = (0.6, 0.8) if process == "ddpm" else (0.3, 0.7)
    conv = lambda p: diffusion.to_x0_eps(p, x_t, a, s, prediction, process)[1]
    np.testing.assert_allclose(np.asarray(conv(samplers.guide(pc, pu, 3.0))),
                               np.asarray(samplers.guide(conv(pc), conv(pu), 3.0)), rtol=1e-5)


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
