"""Image sampling of the discrete (Chameleon-style) baseline: VQ codes after BOI.

References: the full forward pass of the whole document (greedy codes are its
argmax over the codebook's ids), generation without CFG (scale 1 must equal it),
prompts run one by one (batching must not change a row), and the VQ model's own
decode_ids (pixels).
"""
import functools

import numpy as np
import pytest
from flax import nnx

from tests.helpers.inference_helpers import SPECIAL, full_forward
from tests.helpers.packed_batches import tiny_config
from tfusion.inference.engine import Engine
from tfusion.inference.generate import generate
from tfusion.inference.options import GenerationOptions
from tfusion.model.transfusion import Transfusion

CODEBOOK, IMAGE_TOKENS, TEXT_VOCAB = 16, 4, 64


@functools.lru_cache(maxsize=None)
def discrete_engine():
    config = tiny_config(vocab_size=TEXT_VOCAB + CODEBOOK, qk_norm=True)
    config.model.update(image_representation="discrete", codebook_size=CODEBOOK,
                        image_tokens=IMAGE_TOKENS)
    model = Transfusion(config.model, rngs=nnx.Rngs(3))
    return Engine(model, config.diffusion), model


def prompt(*ids):
    return [np.asarray([SPECIAL.bos, *ids, SPECIAL.boi], np.int32)]


def options(**kw):
    return GenerationOptions(**{**dict(max_new_tokens=3, max_images=0, cfg_scale=None), **kw})


def codes_of(generation):
    (codes,) = generation.images
    return codes


def test_codes_are_in_the_codebook_and_greedy_codes_follow_the_full_forward():
    engine, model = discrete_engine()
    offset = TEXT_VOCAB
    p = prompt(10, 11, 12)
    (g,) = generate(engine, [p], SPECIAL, options(image_temperature=0.0), seeds=[0])
    codes = codes_of(g)
    assert codes.shape == (2, 2, 1) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < CODEBOOK
    assert g.tokens[0] == SPECIAL.eoi  # EOI closes the image, then text follows
    # The reference: each code is the argmax over code ids of the full forward logits
    # of the document so far (prompt, then the codes before it).
    doc = list(p[0])
    for code in codes.reshape(-1):
        logits, _ = full_forward(model, [np.asarray(doc, np.int32)])
        assert int(code) == int(np.argmax(logits[-1, offset:offset + CODEBOOK]))
        doc.append(offset + int(code))


def test_sampled_codes_stay_in_range_with_temperature_and_cfg():
    engine, _ = discrete_engine()
    gens = generate(engine, [prompt(20 + i) for i in range(4)], SPECIAL,
                    options(cfg_scale=3.0, image_temperature=2.0), seeds=range(4))
    codes = np.stack([codes_of(g) for g in gens])
    assert codes.min() >= 0 and codes.max() < CODEBOOK
    assert len(np.unique(codes)) > 1  # sampled, not a constant


def test_cfg_scale_one_equals_the_conditional_model():
    engine, _ = discrete_engine()
    prompts = [prompt(30, 31), prompt(40)]
    plain = generate(engine, prompts, SPECIAL, options(cfg_scale=None), seeds=[7, 8])
    scale_one = generate(engine, prompts, SPECIAL, options(cfg_scale=1.0), seeds=[7, 8])
    guided = generate(engine, prompts, SPECIAL, options(cfg_scale=5.0), seeds=[7, 8])
    for a, b in zip(plain, scale_one):
        np.testing.assert_array_equal(codes_of(a), codes_of(b))
        np.testing.assert_array_equal(a.tokens, b.tokens)
    # ... while guidance that is not 1 does change some codes (the test can fail).
    assert any((codes_of(a) != codes_of(c)).any() for a, c in zip(plain, guided))


@pytest.mark.parametrize("cfg_scale", [None, 3.0])
def test_batched_equals_one_by_one(cfg_scale):
    engine, _ = discrete_engine()
    prompts = [prompt(10, 11, 12, 13, 14), prompt(50), prompt(21, 22)]
    seeds = [4, 5, 6]
    batched = generate(engine, prompts, SPECIAL, options(cfg_scale=cfg_scale), seeds=seeds)
    for p, s, b in zip(prompts, seeds, batched):
        (alone,) = generate(engine, [p], SPECIAL, options(cfg_scale=cfg_scale), seeds=[s])
        np.testing.assert_array_equal(codes_of(alone), codes_of(b))
        np.testing.assert_array_equal(alone.tokens, b.tokens)


def test_an_image_prompt_is_read_as_its_code_tokens():
    """Captioning: [BOS BOI] codes [h, w, 1] continues exactly like the same codes
    written as token ids (offset + code) followed by EOI."""
    engine, _ = discrete_engine()
    codes = np.asarray([3, 15, 0, 7], np.int32).reshape(2, 2, 1)
    as_image = [np.asarray([SPECIAL.bos, SPECIAL.boi], np.int32), codes]
    as_tokens = [np.asarray([SPECIAL.bos, SPECIAL.boi, *(TEXT_VOCAB + codes.reshape(-1)),
                             SPECIAL.eoi], np.int32)]
    opts = options(max_new_tokens=6)
    (a,) = generate(engine, [as_image], SPECIAL, opts, seeds=[0])
    (b,) = generate(engine, [as_tokens], SPECIAL, opts, seeds=[0])
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_codes_decode_to_pixels_through_the_vq_decoder(tmp_path):
    import jax.numpy as jnp
    import ml_collections

    from tfusion.autoencoders import AutoencoderConfig, VQModel, save_pretrained
    from tfusion.inference.model_sampler import latents_to_pixels

    vq = VQModel(AutoencoderConfig(block_out_channels=(8,), layers_per_block=1,
                                   latent_channels=4, norm_num_groups=4,
                                   num_vq_embeddings=CODEBOOK), rngs=nnx.Rngs(0))
    save_pretrained(vq, str(tmp_path / "vq"))
    engine, _ = discrete_engine()
    gens = generate(engine, [prompt(10), prompt(11)], SPECIAL, options(cfg_scale=2.0),
                    seeds=[0, 1])
    codes = np.stack([codes_of(g) for g in gens])
    config = ml_collections.ConfigDict(dict(data=dict(
        encoder="vq", encoder_path=str(tmp_path / "vq"), image_size=2)))
    pixels = latents_to_pixels(codes, config)
    assert pixels.shape == (2, 2, 2, 3)
    reference = np.clip(np.asarray(vq.decode_ids(jnp.asarray(codes[..., 0]))), -1, 1)
    np.testing.assert_allclose(pixels, reference, atol=1e-5)
