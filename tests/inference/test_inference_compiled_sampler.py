"""The compiled sampler (steps.diffusion_steps, a lax.fori_loop over the K steps, in
chunks) gives the images of the step-by-step one (one jitted call per step) for every
sampler, with and without CFG."""
import numpy as np
import pytest

from tests.helpers.inference_helpers import SPECIAL, shared_engine
from tfusion.config import SAMPLERS_BY_PROCESS, diffusion_config
from tfusion.inference.engine import Engine
from tfusion.inference.generate import generate
from tfusion.inference.options import GenerationOptions

PROMPTS = [[np.asarray([1, 9, 10, 11, 3])], [np.asarray([1, 12, 3])]]
CASES = [("ddpm", "eps", "ddpm"), ("ddpm", "v", "ddim"), ("flow", "v", "euler"),
         ("flow", "v", "heun"), ("ddpm", "v", "dpmpp_2m"), ("flow", "v", "dpmpp_2m")]
# The quick suite runs ancestral DDPM and the multistep solver (its x0 history carried
# across chunks) with CFG; `pytest -m slow` runs every pair (Heun: two model calls per
# step, a lax.cond inside the loop).
QUICK = {("ddpm", 3.0), ("dpmpp_2m", 3.0)}
MATRIX = [pytest.param(*case, scale, marks=() if (case[2], scale) in QUICK and case[0] == "ddpm"
                       else pytest.mark.slow)
          for case in CASES for scale in (None, 3.0)]


@pytest.fixture(scope="module")
def model():
    return shared_engine()[1]


def _engine(model, process, prediction):
    cfg = diffusion_config()
    cfg.process, cfg.prediction = process, prediction
    # The config's default sampler must belong to its process (each test picks its own).
    cfg.sampler = SAMPLERS_BY_PROCESS[process][0]
    return Engine(model, cfg)


def _images(engine, sampler, cfg_scale, steps_per_call, progress=None):
    options = GenerationOptions(max_new_tokens=1, max_images=1, steps=7, cfg_scale=cfg_scale,
                                sampler=sampler, clip_denoised=1.0, max_len=64,
                                steps_per_call=steps_per_call)
    out = generate(engine, PROMPTS, SPECIAL, options, seeds=[3, 4], progress=progress)
    return [g.images[0] for g in out]


@pytest.mark.parametrize("process, prediction, sampler, cfg_scale", MATRIX)
def test_compiled_sampler_equals_step_by_step(model, process, prediction, sampler, cfg_scale):
    engine = _engine(model, process, prediction)
    reference = _images(engine, sampler, cfg_scale, steps_per_call=1)
    assert np.std(reference[0]) > 0.01  # real images, not a constant
    for per_call in (0, 3):  # one program; chunks of 3, 3, 1 (one compilation)
        for got, want in zip(_images(engine, sampler, cfg_scale, per_call), reference):
            np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_progress_moves_once_per_chunk(model):
    updates = []

    class Bar:
        def __init__(self, total):
            updates.append(("total", total))

        def update(self, n):
            updates.append(n)

        def close(self):
            updates.append("closed")

    _images(_engine(model, "ddpm", "eps"), "ddpm", 3.0, steps_per_call=0, progress=Bar)
    # Per image phase (the BOI-loving model may start a second image), 7 steps with a
    # progress bar: chunks of ceil(7 / 10) = 1 step each.
    phase = [("total", 7)] + [1] * 7 + ["closed"]
    assert len(updates) % len(phase) == 0 and updates == phase * (len(updates) // len(phase))
    updates.clear()
    _images(_engine(model, "ddpm", "eps"), "ddpm", 3.0, steps_per_call=3, progress=Bar)
    phase = [("total", 7), 3, 3, 1, "closed"]
    assert len(updates) % len(phase) == 0 and updates == phase * (len(updates) // len(phase))


def test_an_engine_is_freed_after_use(model):
    """Nothing global (a functools cache on a method) keeps a used engine, and with it
    a device copy of the params, alive."""
    import gc
    import weakref

    engine = _engine(model, "ddpm", "eps")
    _images(engine, "ddpm", None, steps_per_call=0)  # fills its cache makers and schedules
    ref = weakref.ref(engine)
    del engine
    gc.collect()
    assert ref() is None
