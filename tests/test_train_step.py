"""The jitted train step: grad accumulation, non-finite skipping, optimizer details."""
import jax
import numpy as np
import pytest

from tests.packed_batches import random_batch
from tests.train_fixtures import synthetic_config
from tfusion import sharding
from tfusion.objective import Objective
from tfusion.train import optimizer, state as state_lib, step as step_lib
from tfusion.batch import BATCH_NDIMS
from tfusion.train.params import abstract_model


def _setup(mesh_cfg, devices, accum):
    config = synthetic_config()
    mesh = sharding.make_mesh(mesh_cfg, devices)
    table = sharding.rule_table()
    tx = optimizer.make_optimizer(config.optimizer)
    schedule = optimizer.learning_rate_schedule(config.optimizer, config.train.steps)
    shardings = state_lib.state_shardings(config.model, tx, mesh, table)
    graphdef, state = state_lib.init_state(config.model, tx, mesh, table, 0, shardings)
    fn = step_lib.make_train_step(Objective(graphdef, config), tx, schedule, accum, mesh, table)
    jitted = step_lib.jit_train_step(fn, mesh, table, shardings, BATCH_NDIMS)
    batch, _, _ = random_batch(11, config.model, batch_size=8, seq_len=32, max_images=2,
                               as_jax=False)
    return jitted, state, batch


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


ONE = dict(data=1, fsdp=1, tensor=1)


@pytest.mark.parametrize("mesh_cfg", [ONE, dict(data=2, fsdp=2, tensor=2)],
                         ids=["1device", "data2xfsdp2xtensor2"])
def test_grad_accumulation_equals_full_batch(mesh_cfg):
    devices = jax.devices()[:1] if mesh_cfg == ONE else None
    full, state, batch = _setup(ONE, jax.devices()[:1], accum=1)
    acc, state2, _ = _setup(mesh_cfg, devices, accum=2)
    for _ in range(2):  # two steps: the second also checks the Adam moments agree
        state, m_full = full(state, batch)
        state2, m_acc = acc(state2, batch)
        for key in ("loss", "loss_lm", "loss_diffusion", "grad_norm"):
            np.testing.assert_allclose(m_acc[key], m_full[key], rtol=1e-5, err_msg=key)
    for a, b in zip(_leaves(state2["params"]), _leaves(state["params"])):
        # Adam divides by sqrt(v): tiny gradient rounding differences show up ~1e-7 abs.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_nonfinite_batch_is_skipped_and_counted():
    step_fn, state, batch = _setup(ONE, jax.devices()[:1], accum=1)
    before = jax.tree.map(np.asarray, {k: state[k] for k in ("params", "opt_state")})
    bad = dict(batch, images=np.full_like(batch["images"], np.nan))
    state, m = step_fn(state, bad)
    assert int(m["skipped"]) == 1 and int(m["nonfinite_run"]) == 1
    assert int(state["step"]) == 1 and int(state["nonfinite_total"]) == 1
    for a, b in zip(_leaves({k: state[k] for k in ("params", "opt_state")}), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
    state, m = step_fn(state, bad)
    assert int(m["nonfinite_run"]) == 2
    state, m = step_fn(state, batch)  # a good step applies and resets the run
    assert int(m["skipped"]) == 0 and int(m["nonfinite_run"]) == 0
    assert int(state["nonfinite_total"]) == 2 and np.isfinite(float(m["loss"]))


def test_weight_decay_mask_skips_norms_and_biases():
    _, abstract = abstract_model(synthetic_config().model)
    mask = jax.tree_util.tree_leaves_with_path(optimizer.decay_mask(state_lib.to_pure(abstract)))
    by_name = {jax.tree_util.keystr(p): m for p, m in mask}
    assert by_name["['embed']"] and by_name["['lm_head']['kernel']"]
    assert not by_name["['final_norm']['scale']"]
    assert not by_name["['image_encoder']['proj']['bias']"]


def test_learning_rate_schedule_warmup_and_cosine():
    c = synthetic_config().optimizer
    c.update(learning_rate=1.0, warmup_steps=10, final_learning_rate=0.1)
    lr = optimizer.learning_rate_schedule(c, 100)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(10)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(lr(100)), 0.1, rtol=1e-6)
