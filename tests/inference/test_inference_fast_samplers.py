"""Few-step sampling: DPM-Solver++(2M) against diffusers' scheduler and a float64 numpy
derivation, the few-step spacings, and the guidance interval through generate()."""
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers.inference_helpers import SPECIAL, shared_engine
from tfusion import diffusion
from tfusion.config import ConfigError, DiffusionConfig, diffusion_config
from tfusion.inference import diffusion_samplers as samplers
from tfusion.inference.generate import generate
from tfusion.inference.options import GenerationOptions


def _fake_model(x, t):
    """A deterministic stand-in network output (any smooth function of x and t)."""
    return 0.7 * np.tanh(x) + 0.2 * np.cos(x * 1.3 + t / 300.0)


def _run_ours(sched, x, prediction, process):
    """All K steps of dpmpp_2m through samplers.sampler_step; x after each step."""
    x = jnp.asarray(x, jnp.float32)
    x0_last = jnp.zeros_like(x)
    trajectory = []
    for i in reversed(range(sched.num_steps)):
        a, s = sched.signal[i], sched.noise[i]
        pred = jnp.asarray(_fake_model(np.asarray(x), float(sched.model_time[i])), jnp.float32)
        x0, eps = samplers.denoised(pred, x, a, s, prediction, process)
        x = samplers.sampler_step("dpmpp_2m", sched, i, x, x0, eps, None, x0_last)
        x0_last = x0
        trajectory.append(np.asarray(x))
    return trajectory


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("spacing,steps", [("linspace", 12), ("trailing", 10), ("linspace", 20)])
def test_dpmpp_2m_matches_diffusers_step_by_step(prediction, spacing, steps):
    torch = pytest.importorskip("torch")
    from diffusers import DPMSolverMultistepScheduler

    betas = diffusion.cosine_betas(1000)
    sched = samplers.respaced_schedule(diffusion.alphas_cumprod(betas), steps, spacing)
    timesteps = np.asarray(sched.model_time).astype(int)[::-1]  # noisiest first
    ref = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, trained_betas=betas.astype(np.float32), solver_order=2,
        prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction],
        algorithm_type="dpmsolver++", final_sigmas_type="zero", lower_order_final=True)
    ref.set_timesteps(timesteps=[int(t) for t in timesteps])
    x0 = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype(np.float32)
    ours = _run_ours(sched, x0, prediction, "ddpm")
    x = torch.tensor(x0)
    for k, t in enumerate(ref.timesteps):
        out = torch.tensor(_fake_model(x.numpy(), float(t)).astype(np.float32))
        x = ref.step(out, t, x).prev_sample
        np.testing.assert_allclose(ours[k], x.numpy(), rtol=2e-4, atol=2e-4,
                                   err_msg=f"step {k} (t={int(t)})")


def _dpmpp_2m_numpy(a, s, x, model):
    """DPM-Solver++(2M) in float64, from Lu et al.'s lambda form (levels noisiest
    first, the last one (1, 0)): h = lambda_next - lambda, D from the last two x0."""
    lam = np.log(a) - np.log(s)  # -inf at a = 0, +inf at s = 0
    x0_prev = None
    for k in range(len(a) - 1):
        x0 = model(x, k)
        h = lam[k + 1] - lam[k]
        if x0_prev is None or k == len(a) - 2:
            d = x0
        else:
            r = (lam[k] - lam[k - 1]) / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        x = (s[k + 1] / s[k]) * x - a[k + 1] * np.expm1(-h) * d
        x0_prev = x0
    return x


def test_dpmpp_2m_flow_matches_numpy_lambda_form():
    sched = samplers.flow_schedule(9, shift=2.0, num_train_steps=1000)
    x_start = np.random.default_rng(1).normal(size=(3, 8))
    a = np.concatenate([np.asarray(sched.signal, np.float64)[::-1], [1.0]])
    s = np.concatenate([np.asarray(sched.noise, np.float64)[::-1], [0.0]])
    times = np.asarray(sched.model_time, np.float64)[::-1]

    def x0_of(x, k):  # the velocity model's x0 = x_t - t v
        return x - s[k] * _fake_model(x, times[k])

    with np.errstate(divide="ignore"):
        expected = _dpmpp_2m_numpy(a, s, x_start, x0_of)
    got = _run_ours(sched, x_start, "v", "flow")[-1]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def _gaussian_ode_error(sampler, steps, process):
    """For data x0 ~ N(0, c^2) the exact denoiser is E[x0 | x] = a c^2 x / (a^2 c^2 + s^2)
    and the probability-flow ODE keeps x / sqrt(a^2 c^2 + s^2) constant: the exact
    end point of a solve from the first level is known in closed form."""
    c = 0.5
    if process == "ddpm":
        sched = samplers.respaced_schedule(diffusion.alphas_cumprod(diffusion.cosine_betas(1000)),
                                           steps, "trailing")
    else:
        sched = samplers.flow_schedule(steps, 1.0, 1000)
    a_top, s_top = float(sched.signal[-1]), float(sched.noise[-1])
    x = jnp.asarray(np.linspace(-3, 3, 7) * np.sqrt(a_top ** 2 * c ** 2 + s_top ** 2), jnp.float32)
    exact = np.asarray(x) * c / np.sqrt(a_top ** 2 * c ** 2 + s_top ** 2)
    x0_last = jnp.zeros_like(x)
    for i in reversed(range(steps)):
        a, s = sched.signal[i], sched.noise[i]
        x0 = a * c ** 2 * x / (a ** 2 * c ** 2 + s ** 2)
        eps = (x - a * x0) / s
        x_next = samplers.sampler_step(sampler, sched, i, x, x0, eps, jnp.zeros_like(x), x0_last)
        if sampler == "heun":
            x_next = x_next if i == 0 else _heun(sched, i, x, x0, eps, x_next, c)
        x, x0_last = x_next, x0
    return float(np.abs(np.asarray(x) - exact).max())


def _heun(sched, i, x, x0, eps, x_euler, c):
    a, s = sched.signal_prev[i], sched.noise_prev[i]
    x0_e = a * c ** 2 * x_euler / (a ** 2 * c ** 2 + s ** 2)
    eps_e = (x_euler - a * x0_e) / s
    return samplers.heun_correction(x, eps - x0, eps_e - x0_e, sched, i)


@pytest.mark.parametrize("process,first_order", [("ddpm", "ddim"), ("flow", "euler")])
def test_dpmpp_2m_beats_first_order_on_gaussian_data(process, first_order):
    """Against the closed-form ODE solution: 20 steps of 2M land closer than 80 steps
    of the first-order sampler (DDIM / Euler; a first-order 2M would not), and 2M
    keeps converging as steps grow."""
    errs = {k: _gaussian_ode_error("dpmpp_2m", k, process) for k in (20, 40, 80)}
    first = {k: _gaussian_ode_error(first_order, k, process) for k in (20, 80)}
    assert errs[20] < first[80], (errs, first)
    assert errs[80] < errs[40] < errs[20], errs
    if process == "ddpm":  # trailing spacing: 25x closer at 20 steps here
        assert errs[20] < first[20] / 10, (errs, first)


def test_trailing_spacing_matches_diffusers():
    from diffusers import DDIMScheduler

    for steps in (5, 10, 25, 50):
        ref = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
        ref.set_timesteps(steps)
        ours = samplers.respaced_timesteps(1000, steps, "trailing")
        np.testing.assert_array_equal(ours[::-1], ref.timesteps.numpy())


def test_logsnr_spacing_is_uniform_in_log_snr():
    ab = diffusion.make_alpha_bar(diffusion_config())
    sched = samplers.respaced_schedule(ab, 15, "logsnr")
    a, s = np.asarray(sched.signal, np.float64), np.asarray(sched.noise, np.float64)
    lam = 2 * (np.log(a) - np.log(s))
    full = np.log(ab) - np.log1p(-ab)
    np.testing.assert_allclose(lam[[0, -1]], full[[0, -1]], rtol=1e-4)
    np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-3)
    t = np.asarray(sched.model_time, np.float64)
    assert t[0] == 0 and abs(t[-1] - 999) < 1e-3 and (np.diff(t) > 0).all()
    # Between training steps the time is where the log SNR falls, linearly.
    k = 7
    lo = int(np.floor(t[k]))
    frac = t[k] - lo
    np.testing.assert_allclose((1 - frac) * full[lo] + frac * full[lo + 1], lam[k], atol=1e-3)


def test_spacing_and_interval_validated_at_startup():
    with pytest.raises(ConfigError, match="diffusion.sample_spacing"):
        DiffusionConfig(process="flow", prediction="v", sampler="euler",
                        sample_spacing="logsnr").validate()
    with pytest.raises(ConfigError, match="diffusion.cfg_interval"):
        DiffusionConfig(cfg_interval=(0.8, 0.2)).validate()
    DiffusionConfig(sampler="dpmpp_2m", sample_spacing="trailing").validate()


@pytest.fixture(scope="module")
def engine():
    return shared_engine()[0]


def _image(engine, **kw):
    base = dict(max_new_tokens=0, max_images=0, steps=6, cfg_scale=3.0, temperature=0.0,
                max_len=64, clip_denoised=1.0, sampler="dpmpp_2m", spacing="trailing")
    return generate(engine, [[np.asarray([1, 9, 10, 3])]], SPECIAL,
                    GenerationOptions(**{**base, **kw}), seeds=[4])[0].images[0]


def test_guidance_interval(engine):
    plain = _image(engine)
    # The whole range guides every step: plain CFG bit for bit.
    np.testing.assert_array_equal(_image(engine, cfg_interval=(0.0, 1.0)), plain)
    # No level inside (s >= 0.006 at t = 0): the conditional output at every step,
    # which CFG at scale 1 also gives.
    never = _image(engine, cfg_interval=(0.0, 1e-4))
    np.testing.assert_allclose(never, _image(engine, cfg_scale=1.0), atol=1e-5)
    assert np.abs(never - plain).max() > 1e-3
    # Guided at the high-noise steps only: neither of the two.
    part = _image(engine, cfg_interval=(0.5, 1.0), steps_per_call=1)
    assert np.abs(part - plain).max() > 1e-4 and np.abs(part - never).max() > 1e-4
    # The compiled loop and one call per step agree.
    np.testing.assert_allclose(_image(engine, cfg_interval=(0.5, 1.0)), part, atol=1e-5)


def test_cli_sampling_override_names_the_field():
    """--sampler / --spacing / --cfg_interval of generate and evaluate: what does not fit
    the run's process fails at start-up naming the field; what fits reaches the options."""
    import ml_collections

    from tfusion.eval.checkpoints import override_sampling

    flow = ml_collections.ConfigDict(dict(diffusion=dict(
        DiffusionConfig(process="flow", prediction="v", sampler="euler").to_dict())))
    with pytest.raises(ConfigError, match="diffusion.sample_spacing"):
        override_sampling(flow, spacing="trailing")
    with pytest.raises(ConfigError, match="diffusion.sampler"):
        override_sampling(flow, sampler="ddim")
    run = ml_collections.ConfigDict(dict(diffusion=dict(DiffusionConfig().to_dict())))
    del run.diffusion["sample_spacing"], run.diffusion["cfg_interval"]  # saved before they existed
    assert GenerationOptions.from_config(run).spacing == "linspace"
    override_sampling(run, "dpmpp_2m", "trailing", ["0.1", "0.9"])
    options = GenerationOptions.from_config(run)
    assert (options.sampler, options.spacing, options.cfg_interval) == (
        "dpmpp_2m", "trailing", (0.1, 0.9))


@pytest.mark.slow
def test_guidance_interval_on_a_mesh_matches_one_device():
    """The conditional-only steps slice the CFG cache's first rows: on a mesh (batch
    over data x fsdp, kv heads over tensor, 8 fake devices) the images equal the
    single-device ones."""
    from tfusion.inference.engine import Engine
    from tfusion.sharding import make_mesh

    engine, model, config = shared_engine()
    sharded = Engine(model, config.diffusion, mesh=make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    prompts = [[np.asarray([1, 9, 10, 3])], [np.asarray([1, 12, 3])]]
    options = GenerationOptions(max_new_tokens=0, max_images=0, steps=6, cfg_scale=3.0,
                                temperature=0.0, max_len=64, clip_denoised=1.0,
                                sampler="dpmpp_2m", spacing="trailing", cfg_interval=(0.5, 1.0))
    want = generate(engine, prompts, SPECIAL, options, seeds=[4, 5])
    got = generate(sharded, prompts, SPECIAL, options, seeds=[4, 5])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.images[0], w.images[0], atol=1e-5)
