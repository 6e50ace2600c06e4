"""The cached path computes exactly what the full forward pass computes."""
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers.inference_helpers import (TOL, full_forward, random_image, random_tokens,
                                    shared_engine, tiny_engine)
from tfusion.inference.engine import PerLayer
from tfusion.inference.prompts import layout_prompts
from tfusion.inference.steps import CacheColumns


def _prefill(engine, prompts, max_len):
    cfg = engine.cfg
    lay = layout_prompts(prompts, engine.latent_shape, cfg.patch_size, cfg.pad_id)
    cache = engine.new_cache(len(prompts), max_len)
    block = CacheColumns(*(jnp.asarray(lay[k]) for k in ("positions", "segment_ids", "slot")))
    images = jnp.asarray(lay["images"]) if lay["images"].shape[1] else None
    logits, cache = engine.prefill(cache, jnp.asarray(lay["tokens"]), block,
                                   jnp.asarray(lay["image_index"]), images)
    return np.asarray(logits), cache, lay["lengths"]


# Untied modality weights (fresh image twins): cached steps select per position, the
# full forward routes in tiles; both must give each position its own modality's weights.
UNTIED = dict(modality_weights="untied", untied_init="fresh", untied_tile=8)


@pytest.mark.parametrize("scan_layers, untied", [
    (True, False), (True, True), pytest.param(False, False, marks=pytest.mark.slow)])
def test_cached_text_decoding_matches_full_forward(scan_layers, untied):
    engine, model, config = (tiny_engine(**UNTIED) if untied else shared_engine()
                             if scan_layers else tiny_engine(scan_layers=False))
    cfg = config.model
    rng = np.random.default_rng(0)
    steps = 4
    # Row 0 has an image in its prompt; row 1 is shorter (right-padded).
    docs = [[random_tokens(rng, 3, cfg.vocab_size), random_image(rng, cfg),
             random_tokens(rng, 2 + steps, cfg.vocab_size)],
            [random_tokens(rng, 2 + steps, cfg.vocab_size)]]
    prompts = [d[:-1] + [d[-1][:2]] for d in docs]
    refs = [full_forward(model, d)[0] for d in docs]
    logits, cache, lengths = _prefill(engine, prompts, max_len=32)
    for r in range(2):
        np.testing.assert_allclose(logits[r], refs[r][lengths[r] - 1], atol=TOL)
    for s in range(steps):
        fed = jnp.asarray([d[-1][2 + s] for d in docs], jnp.int32)
        pos = lengths + s
        block = CacheColumns(jnp.asarray(pos[:, None]), jnp.ones((2, 1), jnp.int32),
                      jnp.full((2, 1), -1, jnp.int32))
        keys = engine.keys([0, 1])
        _, logits, cache = engine.text_step(cache, fed[:, None], block, keys, jnp.zeros(2, jnp.int32),
                                            None, 0.0, 1.0, top_k=0)
        for r in range(2):
            np.testing.assert_allclose(np.asarray(logits[r]), refs[r][pos[r]], atol=TOL)


@pytest.mark.parametrize("modality_layer,scan_layers",
                         [("linear", True), ("unet", True), ("linear", False), ("untied", True)])
def test_diffusion_step_matches_full_forward(modality_layer, scan_layers):
    """Also for an unrolled layer loop, whose engine keeps weights and cache per layer
    (re-stacked inside each jitted step, cache columns written in place), and for untied
    modality weights."""
    if modality_layer == "untied":
        engine, model, config = tiny_engine(**UNTIED)
    elif not scan_layers:
        engine, model, config = tiny_engine(scan_layers=False)
        assert isinstance(engine.state["backbone"]["blocks"]["mlp"]["down"]["kernel"].get_value(),
                          PerLayer)
    else:
        engine, model, config = (shared_engine() if modality_layer == "linear" else
                                 tiny_engine(modality_layer="unet", unet_channels=(32, 32)))
    cfg = config.model
    rng = np.random.default_rng(1)
    t = 417
    prefixes = [[random_tokens(rng, 4, cfg.vocab_size)], [random_tokens(rng, 2, cfg.vocab_size)]]
    noisy = [random_image(rng, cfg) for _ in prefixes]
    refs = [full_forward(model, pre + [img], t_value=t)[1][0] for pre, img in zip(prefixes, noisy)]
    _, cache, lengths = _prefill(engine, prefixes, max_len=24)
    p = engine.patches_per_image
    start = np.asarray(cache.index)  # each row's frontier: its prompt's length
    np.testing.assert_array_equal(start, lengths)
    block = CacheColumns(jnp.asarray(lengths[:, None] + np.arange(p)), jnp.ones((2, p), jnp.int32),
                  jnp.asarray(np.repeat(start[:, None], p, axis=1), jnp.int32))
    x_t = jnp.asarray(np.stack([img.latent for img in noisy]))
    # Twice at the same columns: the second call must not see the first one's k/v twice.
    for _ in range(2):
        eps, cache = engine.predict(cache, x_t, jnp.full((2,), t, jnp.float32), block)
        np.testing.assert_allclose(np.asarray(eps), np.stack(refs), atol=TOL)
        np.testing.assert_array_equal(np.asarray(cache.index), start)


def test_sharded_cache_matches_single_device():
    """Batch over data, kv heads over tensor (8 fake devices): same logits and eps."""
    from tfusion.inference.engine import Engine
    from tfusion.sharding import make_mesh

    engine, model, config = shared_engine()
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = Engine(model, config.diffusion, mesh=mesh)
    rng = np.random.default_rng(3)
    prompts = [[random_tokens(rng, 5, config.model.vocab_size)],
               [random_tokens(rng, 3, config.model.vocab_size)]]
    ref, _, _ = _prefill(engine, prompts, max_len=16)
    got, cache, _ = _prefill(sharded, prompts, max_len=16)
    np.testing.assert_allclose(got, ref, atol=TOL)
    spec = cache.k[0].sharding.spec  # layer 0 of [depth, B, Hkv, S, Dh], kept per layer
    assert spec[0] == "data" and spec[1] == "tensor", spec
