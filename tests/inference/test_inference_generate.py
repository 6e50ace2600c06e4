"""Generation driver: CFG, seeds, batching, several images, text stopping rules."""
import numpy as np
import pytest

from tests.helpers.inference_helpers import SPECIAL, shared_engine
from tfusion.inference.generate import generate
from tfusion.inference.options import GenerationOptions


@pytest.fixture(scope="module")
def engine():
    return shared_engine()[0]


def _opts(**kw):
    base = dict(max_new_tokens=4, max_images=1, steps=4, cfg_scale=3.0, temperature=1.0,
                top_k=20, top_p=0.9, max_len=64, clip_denoised=1.0)
    return GenerationOptions(**{**base, **kw})


PROMPTS = [[np.asarray([1, 9, 10, 11, 3])], [np.asarray([1, 12])]]


def _assert_same(a, b, atol=1e-5):
    assert len(a.segments) == len(b.segments)
    for x, y in zip(a.segments, b.segments):
        if x.ndim == 1:
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, atol=atol)


def test_batched_equals_one_by_one_and_seed_reproduces(engine):
    batched = generate(engine, PROMPTS, SPECIAL, _opts(), seeds=[5, 7])
    # Row 0: the prompt's image, then a sampled one; row 1: one sampled image.
    assert [len(g.images) for g in batched] == [2, 1]
    assert batched[0].tokens[0] == SPECIAL.eoi
    alone = [generate(engine, [prompt], SPECIAL, _opts(), seeds=[seed])[0]
             for prompt, seed in zip(PROMPTS, [5, 7])]
    for one, expected in zip(alone, batched):
        _assert_same(one, expected)
    again = generate(engine, PROMPTS[:1], SPECIAL, _opts(), seeds=[5])[0]
    _assert_same(again, alone[0], atol=0)
    other = generate(engine, PROMPTS[:1], SPECIAL, _opts(), seeds=[6])[0]
    assert np.abs(other.images[0] - batched[0].images[0]).max() > 1e-3


def test_cfg_scale_one_equals_conditional(engine):
    opts = dict(max_new_tokens=0, max_images=0, temperature=0.0)
    guided = generate(engine, PROMPTS[:1], SPECIAL, _opts(cfg_scale=1.0, **opts), seeds=[3])[0]
    plain = generate(engine, PROMPTS[:1], SPECIAL, _opts(cfg_scale=None, **opts), seeds=[3])[0]
    strong = generate(engine, PROMPTS[:1], SPECIAL, _opts(cfg_scale=5.0, **opts), seeds=[3])[0]
    assert len(plain.images) == 1
    np.testing.assert_allclose(guided.images[0], plain.images[0], atol=1e-5)
    assert np.abs(strong.images[0] - plain.images[0]).max() > 1e-3


def test_text_stops_at_eos_and_max_tokens(engine):
    # Without images BOI is banned; greedy text stops at max_new_tokens.
    out = generate(engine, PROMPTS[1:], SPECIAL, _opts(max_images=0, max_new_tokens=5,
                                                       temperature=0.0), seeds=[0])[0]
    assert len(out.images) == 0 and len(out.tokens) == 5
    assert not np.isin(out.tokens, [SPECIAL.pad, SPECIAL.bos, SPECIAL.boi, SPECIAL.eoi]).any()


def test_uncond_prompts_bare_bos_boi_equals_default_twin(engine):
    """A twin prefilled with `BOS BOI` is what the default twin writes at its image: the
    same image, batched with a row whose twin prompt differs (an image and words)."""
    opts = _opts(max_new_tokens=0, max_images=0, temperature=0.0)
    prompt = [np.asarray([1, 9, 10, 11, 3])]
    default = generate(engine, [prompt], SPECIAL, opts, seeds=[3])[0]
    rng = np.random.default_rng(0)
    image = rng.normal(size=engine.latent_shape).astype(np.float32)
    other_twin = [np.asarray([1, 3]), image, np.asarray([4, 3])]
    twins = [[np.asarray([SPECIAL.bos, SPECIAL.boi])], other_twin]
    both = generate(engine, [prompt, prompt], SPECIAL, opts, seeds=[3, 3], uncond_prompts=twins)
    _assert_same(both[0], default)
    assert np.abs(both[1].images[0] - default.images[0]).max() > 1e-3  # its twin is read
    plain = generate(engine, [prompt], SPECIAL, _opts(max_new_tokens=0, max_images=0,
                                                      temperature=0.0, cfg_scale=1.0),
                     seeds=[3], uncond_prompts=[other_twin])[0]
    unguided = generate(engine, [prompt], SPECIAL, _opts(max_new_tokens=0, max_images=0,
                                                         temperature=0.0, cfg_scale=None),
                        seeds=[3])[0]
    np.testing.assert_allclose(plain.images[0], unguided.images[0], atol=1e-5)
    with pytest.raises(ValueError, match="end in BOI"):
        generate(engine, [prompt], SPECIAL, opts, seeds=[3], uncond_prompts=[[np.asarray([1])]])
