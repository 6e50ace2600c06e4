"""Sharded loss and gradients equal the single-device computation."""
import jax
import numpy as np
import pytest

from tests.helpers.packed_batches import random_batch, tiny_config
from jax.sharding import NamedSharding, PartitionSpec

from tfusion import sharding
from tfusion.batch import BATCH_NDIMS
from tfusion.train.params import init_params
from tfusion.train.step import Objective, batch_shardings

# Pure data parallelism (data8) runs in the slow suite; fsdp and tensor sharding here.
MESHES = [pytest.param(dict(data=8, fsdp=1, tensor=1), marks=pytest.mark.slow),
          dict(data=2, fsdp=4, tensor=1), dict(data=2, fsdp=2, tensor=2)]


@pytest.fixture(scope="module")
def setup():
    # width 64 / 4 heads / mlp 128: every sharded axis divides the mesh axes.
    config = tiny_config(width=64, num_heads=4, mlp_hidden=128, vocab_size=64)
    batch, _, _ = random_batch(5, config.model, batch_size=8, seq_len=32, max_images=2)
    graphdef, params = init_params(config.model, None, None, seed=0)
    objective = Objective(graphdef, config)
    rng = jax.random.key(3)
    (loss, aux), grads = jax.jit(jax.value_and_grad(objective.loss, has_aux=True))(
        params, batch, rng)
    return config, batch, objective, rng, loss, aux, grads


@pytest.mark.parametrize("mesh_cfg", MESHES, ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items()))
def test_sharded_matches_single_device(setup, mesh_cfg):
    config, batch, objective, rng, loss, aux, grads = setup
    mesh = sharding.make_mesh(mesh_cfg)
    table = sharding.rule_table()
    graphdef, params = init_params(config.model, mesh, table, seed=0)
    shardings = sharding.state_shardings(params, mesh, table)

    def loss_and_grad(params, batch, rng):
        with sharding.activation_sharding(mesh, table):
            return jax.value_and_grad(objective.loss, has_aux=True)(params, batch, rng)

    replicated = NamedSharding(mesh, PartitionSpec())
    step = jax.jit(loss_and_grad,
                   in_shardings=(shardings, batch_shardings(mesh, table, BATCH_NDIMS), replicated),
                   out_shardings=((replicated, replicated), shardings))
    (s_loss, s_aux), s_grads = step(params, batch, rng)
    np.testing.assert_allclose(s_loss, loss, rtol=1e-5)
    np.testing.assert_allclose(s_aux["loss_lm"], aux["loss_lm"], rtol=1e-5)
    np.testing.assert_allclose(s_aux["loss_diffusion"], aux["loss_diffusion"], rtol=1e-5)
    flat_s = jax.tree_util.tree_leaves_with_path(s_grads)
    flat = dict(jax.tree_util.tree_leaves_with_path(grads))
    for path, g in flat_s:
        np.testing.assert_allclose(np.asarray(g), np.asarray(flat[path]), rtol=2e-4, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
    # The mesh was really used: some parameter is split across devices.
    if mesh_cfg["fsdp"] > 1 or mesh_cfg["tensor"] > 1:
        specs = [s.spec for s in jax.tree.leaves(jax.tree.map(lambda a: a.sharding, params))]
        assert any(any(ax is not None for ax in spec) for spec in specs)
