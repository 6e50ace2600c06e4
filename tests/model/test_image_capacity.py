"""Image capacity: the modality layers run on the images present (per row group), and
the model's outputs and gradients equal those of running them on every slot."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers.packed_batches import random_batch, tiny_config
from tfusion.model.transfusion import ImageCapacity, Transfusion, active_slots


def test_active_slots_are_the_present_ones_in_order():
    rng = np.random.default_rng(0)
    for groups, rows, m in ((1, 4, 3), (2, 6, 2), (4, 8, 4)):
        mask = rng.random((rows, m)) < 0.4
        per_group = rows // groups * m
        need = int(mask.reshape(groups, -1).sum(1).max())
        order = np.asarray(active_slots(jnp.asarray(mask), ImageCapacity(groups, need)).order)
        for g in range(groups):
            present = np.flatnonzero(mask.reshape(groups, per_group)[g])
            np.testing.assert_array_equal(order[g, :len(present)], present)
            assert len(set(order[g].tolist())) == need  # distinct slots


def _capacity_for(batch, groups: int, extra: int = 0) -> ImageCapacity:
    mask = np.asarray(batch["image_mask"])
    return ImageCapacity(groups, int(mask.reshape(groups, -1).sum(1).max()) + extra)


@pytest.mark.parametrize("layer, groups, extra", [
    ("linear", 4, 0),
    # ~20-40 s each on 2 cores: in the slow suite.
    pytest.param("linear", 1, 0, marks=pytest.mark.slow),
    pytest.param("unet", 2, 1, marks=pytest.mark.slow)])
def test_forward_and_gradients_equal_every_slot(layer, groups, extra):
    overrides = dict(modality_layer=layer)
    if layer == "unet":
        overrides.update(unet_channels=(32, 32))
    cfg = tiny_config(**overrides).model
    model = Transfusion(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    batch, _, _ = random_batch(5, cfg, batch_size=8, seq_len=48, max_images=3)
    mask = np.asarray(batch["image_mask"])
    assert 0 < mask.sum() < mask.size  # some slots empty, some not
    rng = np.random.default_rng(1)
    noisy = jnp.asarray(rng.normal(size=batch["images"].shape).astype(np.float32))
    t = jnp.asarray(rng.uniform(0, 999, size=mask.shape).astype(np.float32))
    capacity = _capacity_for(batch, groups, extra)

    def loss(p, cap):
        logits, eps = nnx.merge(graphdef, p)(batch, noisy, t, cap)
        weights = jnp.asarray(mask, jnp.float32)[..., None, None, None]
        return jnp.sum(logits[..., :8] ** 2) * 1e-3 + jnp.sum(eps ** 2 * weights), (logits, eps)

    (full, (logits, eps)), grads = jax.value_and_grad(loss, has_aux=True)(params, None)
    (got, (logits_c, eps_c)), grads_c = jax.value_and_grad(loss, has_aux=True)(params, capacity)
    np.testing.assert_allclose(logits_c, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(eps_c)[mask], np.asarray(eps)[mask], rtol=1e-5,
                               atol=1e-5)
    assert not np.asarray(eps_c)[~mask].any()  # empty slots: zeros, never computed
    np.testing.assert_allclose(got, full, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_capacity_larger_than_the_group_is_refused():
    cfg = tiny_config().model
    batch, _, _ = random_batch(5, cfg, batch_size=4, seq_len=48, max_images=2)
    with pytest.raises(ValueError, match="exceeds the group's 4 slots"):
        active_slots(batch["image_mask"], ImageCapacity(2, 5))


def test_sharded_train_step_with_capacity_equals_every_slot():
    """On 8 devices (data 2 x fsdp 4: 8 image groups of one row), the train step's loss
    sums and gradients with the modality layers on the images present (2 of 4 slots per
    row) equal those on every slot."""
    import ml_collections

    from tests.helpers.packed_batches import random_rows
    from tfusion import sharding
    from tfusion.batch import BatchSpec, assemble_rows
    from tfusion.train.step import Objective, loss_and_grads

    config = tiny_config()
    cfg = config.model
    rows, spec = random_rows(np.random.default_rng(2), cfg, 8, 48, max_images=2)
    wide = BatchSpec(8, 48, 4, spec.latent_shape, spec.patch_size)  # 4 slots, <= 2 used
    batch = {k: jnp.asarray(v) for k, v in assemble_rows(rows, wide, cfg.pad_id).items()}
    assert np.asarray(batch["image_mask"]).sum() > 4
    mesh_config = dict(data=2, fsdp=4, tensor=1)
    mesh, table = sharding.make_mesh(mesh_config), sharding.mesh_rules(mesh_config)
    graphdef, params = nnx.split(Transfusion(cfg, rngs=nnx.Rngs(0)))
    results = []
    for per_row in (0.0, 2.0):
        config.train = ml_collections.ConfigDict(dict(batch_size=8, grad_accum_steps=1))
        config.data = ml_collections.ConfigDict(dict(image_capacity_per_row=per_row))
        objective = Objective(graphdef, config, image_groups=8)
        assert (objective.capacity(8) is None) == (not per_row)

        @jax.jit
        def run(p, b, objective=objective):
            with sharding.activation_sharding(mesh, table):
                return loss_and_grads(objective, p, b, jax.random.key(3), 1, mesh, table)

        results.append(run(params, batch))
    (sums_a, grads_a), (sums_b, grads_b) = results
    for k in sums_a:
        np.testing.assert_allclose(sums_b[k], sums_a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
