"""Untied modality weights (model.modality_weights="untied", Mixture-of-Transformers).

References: a brute-force walk over the routing tiles; the shared model (copy init, and
text-only rows); the per-position select of both projections (every position computes
both, keeps its own: the obviously correct and twice as costly form); a single-device
step for the sharded one; XLA's cost analysis for the FLOP claim."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers.packed_batches import random_batch, tiny_config
from tfusion.config import ModelConfig
from tfusion.model import transfusion as transfusion_lib
from tfusion.model.transformer import from_tiles, route_by_modality, to_tiles
from tfusion.model.transfusion import Transfusion, copy_text_to_image, image_twin_of
from tfusion.train import optimizer


@pytest.mark.parametrize("rows, length, tile, p_image", [
    (4, 20, 8, 0.6), (2, 33, 16, 0.3), (3, 16, 4, 0.0), (3, 16, 4, 1.0), (1, 64, 64, 0.5)])
def test_tiles_hold_one_modality_and_give_every_position_back(rows, length, tile, p_image):
    rng = np.random.default_rng(rows * length + tile)
    is_image = rng.random((rows, length)) < p_image
    routing = route_by_modality(jnp.asarray(is_image), tile)
    n = rows * length
    source, tile_is_image = np.asarray(routing.source)[0], np.asarray(routing.tile_is_image)[0]
    assert len(tile_is_image) == -(-n // tile) + 1  # at most one tile more than n needs
    seen = []
    for t, image in enumerate(tile_is_image):
        positions = source[t * tile:(t + 1) * tile]
        positions = positions[positions < n]  # n: a padding row
        assert (is_image.reshape(-1)[positions] == image).all(), t
        seen += positions.tolist()
    assert sorted(seen) == list(range(n))  # each position in exactly one tile row
    x = jnp.asarray(rng.normal(size=(rows, length, 3)).astype(np.float32))
    np.testing.assert_array_equal(from_tiles(to_tiles(x, routing), routing, rows), x)


def _untied(cfg, **changes) -> ModelConfig:
    return dataclasses.replace(ModelConfig.of(cfg), modality_weights="untied", **changes)


def _inputs(cfg, seed=5, batch_size=4, seq_len=48):
    batch, rows, _ = random_batch(seed, cfg, batch_size=batch_size, seq_len=seq_len,
                                  max_images=3)
    mask = np.asarray(batch["image_mask"])
    assert mask.any() and (np.asarray(batch["image_index"]) < 0).any()
    rng = np.random.default_rng(seed)
    noisy = jnp.asarray(rng.normal(size=batch["images"].shape).astype(np.float32))
    t = jnp.asarray(rng.uniform(0, 999, size=mask.shape).astype(np.float32))
    return batch, noisy, t


def _forward(model, batch, noisy, t):
    """model(batch, noisy, t), jitted (eager op-by-op dispatch is the slow part here)."""
    graphdef, params = nnx.split(model)
    return jax.jit(lambda p: nnx.merge(graphdef, p)(batch, noisy, t))(params)


def _shared_into_untied(shared: Transfusion, untied: Transfusion) -> None:
    """untied's text side (the shared names) set to shared's params."""
    text = nnx.traversals.flatten_mapping(nnx.state(shared, nnx.Param).to_pure_dict())
    state = nnx.state(untied, nnx.Param)
    flat = nnx.traversals.flatten_mapping(state.to_pure_dict())
    flat.update(text)
    state.replace_by_pure_dict(nnx.traversals.unflatten_mapping(flat))
    nnx.update(untied, state)


def test_copy_init_computes_the_shared_model():
    cfg = ModelConfig.of(tiny_config(untied_tile=16).model)
    shared = Transfusion(cfg, rngs=nnx.Rngs(0))
    untied = Transfusion(_untied(cfg, untied_init="fresh"), rngs=nnx.Rngs(1))
    _shared_into_untied(shared, untied)
    batch, noisy, t = _inputs(cfg)
    logits, eps = _forward(untied, batch, noisy, t)
    ref_logits, ref_eps = _forward(shared, batch, noisy, t)
    assert np.abs(np.asarray(logits - ref_logits)).max() > 1e-3  # fresh twins differ
    state = nnx.state(untied, nnx.Param)
    nnx.update(untied, copy_text_to_image(state))
    logits, eps = _forward(untied, batch, noisy, t)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(eps, ref_eps, rtol=1e-5, atol=1e-5)


def _perturbed_untied(cfg, seed=0):
    """An untied model whose every image twin differs from its text weight (norm scales
    included, which fresh init leaves at 1 like the text ones)."""
    model = Transfusion(_untied(cfg, untied_init="fresh"), rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    flat = nnx.traversals.flatten_mapping(state.to_pure_dict())
    rng = np.random.default_rng(seed)
    twins = [p for p in flat if image_twin_of(p) is not None]
    assert any(p[-1] == "scale" for p in twins) and any(p[-2] == "image_qkv" for p in twins)
    for path in twins:
        flat[path] = flat[path] + 0.1 * jnp.asarray(rng.normal(size=flat[path].shape),
                                                    flat[path].dtype)
    state.replace_by_pure_dict(nnx.traversals.unflatten_mapping(flat))
    nnx.update(model, state)
    return model


@pytest.mark.parametrize("qk_norm, qkv_bias, unroll", [
    (False, False, True), pytest.param(True, True, False, marks=pytest.mark.slow)])
def test_tiled_routing_equals_per_position_select(monkeypatch, qk_norm, qkv_bias, unroll):
    cfg = ModelConfig.of(tiny_config(untied_tile=16, qk_norm=qk_norm, qkv_bias=qkv_bias,
                                     num_kv_heads=2, untied_unroll=unroll).model)
    model = _perturbed_untied(cfg)
    graphdef, params = nnx.split(model)
    batch, noisy, t = _inputs(cfg)
    mask = jnp.asarray(batch["image_mask"], jnp.float32)[..., None, None, None]

    def loss(p):
        logits, eps = nnx.merge(graphdef, p)(batch, noisy, t)
        return jnp.sum(logits[..., :8] ** 2) * 1e-3 + jnp.sum(eps ** 2 * mask), (logits, eps)

    # A new jitted lambda per call: each traces the model as routed at that moment.
    (tiled, (logits, eps)), grads = jax.jit(
        lambda p: jax.value_and_grad(loss, has_aux=True)(p))(params)
    route = transfusion_lib.route_by_modality
    monkeypatch.setattr(transfusion_lib, "route_by_modality",
                        lambda is_image, tile, tiled=True: route(is_image, tile, tiled=False))
    (select, (ref_logits, ref_eps)), ref_grads = jax.jit(
        lambda p: jax.value_and_grad(loss, has_aux=True)(p))(params)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(eps, ref_eps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tiled, select, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=str(path))


@pytest.mark.slow  # suite time; the per-position select test covers the routing
def test_image_twins_act_only_at_image_positions():
    """A row with no image computes exactly what the shared model with the text weights
    computes; rows with images do not (their twins differ)."""
    cfg = ModelConfig.of(tiny_config(untied_tile=16).model)
    model = _perturbed_untied(cfg)
    shared = Transfusion(cfg, rngs=nnx.Rngs(0))
    text = {p: v for p, v in nnx.traversals.flatten_mapping(
        nnx.state(model, nnx.Param).to_pure_dict()).items() if image_twin_of(p) is None
        and p[0] != "image_final_norm"}
    state = nnx.state(shared, nnx.Param)
    state.replace_by_pure_dict(nnx.traversals.unflatten_mapping(text))
    nnx.update(shared, state)
    # The first random batch with rows of both kinds.
    batch, noisy, t = next(b for b in (_inputs(cfg, seed) for seed in range(50))
                           if 0 < np.asarray(b[0]["image_mask"]).any(axis=1).sum() < 4)
    logits, _ = _forward(model, batch, noisy, t)
    ref, _ = _forward(shared, batch, noisy, t)
    has_image = np.asarray(batch["image_mask"]).any(axis=1)
    np.testing.assert_allclose(np.asarray(logits)[~has_image], np.asarray(ref)[~has_image],
                               rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(logits - ref)[has_image]).max() > 1e-3


def _step_flops(cfg, batch, noisy, t) -> float:
    graphdef, params = nnx.split(Transfusion(cfg, rngs=nnx.Rngs(0)))

    def loss(p):
        logits, eps = nnx.merge(graphdef, p)(batch, noisy, t)
        return jnp.sum(logits ** 2) + jnp.sum(eps ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return float(compiled.cost_analysis()["flops"])


def test_untied_step_costs_the_shared_steps_flops(monkeypatch):
    """Executed FLOPs (XLA cost analysis of the loss gradient, layers and tiles unrolled
    so that every iteration is counted) of the untied model within 10% of the shared one; the
    per-position select, which computes both projections, is far above."""
    cfg = ModelConfig.of(tiny_config(width=64, num_heads=4, untied_tile=64,
                                     scan_layers=False, untied_unroll=True).model)
    batch, noisy, t = _inputs(cfg, batch_size=4, seq_len=256)
    shared = _step_flops(cfg, batch, noisy, t)
    untied = _step_flops(_untied(cfg), batch, noisy, t)
    assert 1.0 <= untied / shared < 1.10, untied / shared
    route = transfusion_lib.route_by_modality
    monkeypatch.setattr(transfusion_lib, "route_by_modality",
                        lambda is_image, tile, tiled=True: route(is_image, tile, tiled=False))
    both = _step_flops(_untied(cfg), batch, noisy, t)
    assert both / shared > 1.3, both / shared


def test_freeze_text_keeps_the_text_side_and_trains_the_twins():
    cfg = ModelConfig.of(tiny_config().model)
    params = nnx.state(Transfusion(_untied(cfg), rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict()
    frozen = nnx.traversals.flatten_mapping(optimizer.frozen_mask(params, ("text",)))
    for path, is_frozen in frozen.items():
        image_side = any(str(k).startswith("image_") for k in path)
        assert is_frozen == (not image_side), path
    assert frozen[("backbone", "blocks", "attn", "qkv", "kernel")]
    assert not frozen[("backbone", "blocks", "attn", "image_qkv", "kernel")]
    assert not frozen[("image_final_norm", "scale")]


@pytest.mark.slow  # ~30-70 s of compiles on 2 cores
def test_sharded_untied_step_equals_single_device():
    """On 8 devices (data 2 x fsdp 4) every device routes its own rows (8 groups); the
    loss sums and gradients equal one device's (one group)."""
    import ml_collections

    from tfusion import sharding
    from tfusion.train.step import Objective, loss_and_grads

    config = tiny_config(modality_weights="untied", untied_init="fresh", untied_tile=16)
    cfg = config.model
    batch, _, _ = random_batch(3, cfg, batch_size=8, seq_len=48, max_images=2)
    config.train = ml_collections.ConfigDict(dict(batch_size=8, grad_accum_steps=1))
    graphdef, params = nnx.split(_perturbed_untied(ModelConfig.of(cfg)))
    objective = Objective(graphdef, config)
    mesh_config = dict(data=2, fsdp=4, tensor=1)
    mesh, table = sharding.make_mesh(mesh_config), sharding.mesh_rules(mesh_config)

    @jax.jit
    def sharded(p, b):
        with sharding.activation_sharding(mesh, table):
            return loss_and_grads(objective, p, b, jax.random.key(3), 1, mesh, table)

    single = jax.jit(lambda p, b: loss_and_grads(objective, p, b, jax.random.key(3), 1, None,
                                                 table))
    (sums_a, grads_a), (sums_b, grads_b) = single(params, batch), sharded(params, batch)
    for k in sums_a:
        np.testing.assert_allclose(sums_b[k], sums_a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
