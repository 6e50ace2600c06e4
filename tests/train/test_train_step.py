"""The jitted train step: grad accumulation, non-finite skipping, optimizer details."""
import jax
import numpy as np
import pytest

from tests.helpers.packed_batches import random_batch
from tests.helpers.train_fixtures import synthetic_config
from tfusion import sharding
from tfusion.train.step import Objective
from tfusion.train import optimizer, state as state_lib, step as step_lib
from tfusion.batch import BATCH_NDIMS
from tfusion.train.params import abstract_model


def _setup(mesh_cfg, devices, accum, ema_decay=0.0, **diffusion_fields):
    config = synthetic_config()
    config.diffusion.update(diffusion_fields)
    config.train.ema_decay = ema_decay
    mesh = sharding.make_mesh(mesh_cfg, devices)
    table = sharding.rule_table()
    tx = optimizer.make_optimizer(config.optimizer)
    schedule = optimizer.learning_rate_schedule(config.optimizer, config.train.steps)
    shardings = state_lib.train_state_shardings(config.model, tx, mesh, table, ema=ema_decay > 0)
    graphdef, state = state_lib.init_state(config.model, tx, mesh, table, 0, shardings)
    fn = step_lib.make_train_step(Objective(graphdef, config), tx, schedule, accum, mesh, table,
                                  ema_decay=ema_decay)
    jitted = step_lib.jit_train_step(fn, mesh, table, shardings, BATCH_NDIMS)
    batch, _, _ = random_batch(11, config.model, batch_size=8, seq_len=32, max_images=2,
                               as_jax=False)
    return jitted, state, batch


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


ONE = dict(data=1, fsdp=1, tensor=1)


@pytest.mark.parametrize("mesh_cfg", [pytest.param(ONE, marks=pytest.mark.slow),
                                      dict(data=2, fsdp=2, tensor=2)],
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
        # Adam divides by sqrt(v): tiny gradient rounding differences show up ~1e-7 abs,
        # up to ~2.5e-6 on a near-zero gradient since the LM head's vocab is padded (64 ->
        # 128 columns: the tensor shards reduce the log-partition in another order).
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-6)


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


@pytest.mark.parametrize("mesh_cfg", [ONE, dict(data=2, fsdp=2, tensor=2)],
                         ids=["1device", "data2xfsdp2xtensor2"])
def test_ema_matches_numpy_ema_and_is_sharded_like_params(mesh_cfg):
    devices = jax.devices()[:1] if mesh_cfg == ONE else None
    step_fn, state, batch = _setup(mesh_cfg, devices, accum=1, ema_decay=0.9)
    ema = _leaves(state["params"])  # the EMA starts at the initial params
    for n in range(4):
        state, _ = step_fn(state, batch)
        decay = min(0.9, (1 + n) / (10 + n))  # warm-up: 0.1, 0.18, 0.25, 0.31
        ema = [decay * e + (1 - decay) * p for e, p in zip(ema, _leaves(state["params"]))]
        for got, want in zip(_leaves(state["ema_params"]), ema):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert any(np.abs(a - b).max() > 0 for a, b in
               zip(_leaves(state["ema_params"]), _leaves(state["params"])))
    for e, p in zip(jax.tree.leaves(state["ema_params"]), jax.tree.leaves(state["params"])):
        assert e.sharding.is_equivalent_to(p.sharding, e.ndim)
    # A non-finite step leaves the EMA alone.
    before = _leaves(state["ema_params"])
    state, _ = step_fn(state, dict(batch, images=np.full_like(batch["images"], np.nan)))
    for a, b in zip(_leaves(state["ema_params"]), before):
        np.testing.assert_array_equal(a, b)


def test_flow_training_step_loss_matches_numpy():
    """process=flow: x_t = (1 - t) x0 + t eps, velocity target eps - x0, plain MSE per
    image; the train step's reported diffusion loss is the numpy one on the same draw."""
    from tests.helpers.train_fixtures import synthetic_config as cfg_fn
    from tfusion import losses
    from flax import nnx
    step_fn, state, batch = _setup(ONE, jax.devices()[:1], accum=1, process="flow",
                                   prediction="v", sampler="euler")
    config = cfg_fn()
    config.diffusion.update(process="flow", prediction="v", sampler="euler")
    graphdef, _ = abstract_model(config.model)
    params = jax.tree.map(lambda x: np.array(x, copy=True), state["params"])
    jb = {k: jax.numpy.asarray(v) for k, v in batch.items()}
    rng = jax.block_until_ready(state_lib.step_key(state["rng"], state["step"]))
    _, metrics = step_fn(state, batch)
    # The step's draw: t from the first half of the step key, noise from the second.
    t_rng, n_rng = jax.random.split(rng)
    t = np.asarray(jax.random.uniform(t_rng, batch["image_t_max"].shape)) \
        * batch["image_t_max"] / 999.0
    eps = np.asarray(jax.random.normal(n_rng, batch["images"].shape))
    x0 = batch["images"].astype(np.float64)
    tb = t[..., None, None, None]
    x_t = (1 - tb) * x0 + tb * eps
    model = nnx.merge(graphdef, params)
    logits, pred = model(jb, jax.numpy.asarray(x_t, np.float32),
                         jax.numpy.asarray(t * 999.0, np.float32))
    mask = batch["image_mask"]
    per_image = np.mean((np.asarray(pred, np.float64) - (eps - x0)) ** 2, axis=(2, 3, 4))
    want = per_image[mask].mean()
    np.testing.assert_allclose(float(metrics["loss_diffusion"]), want, rtol=2e-4)
    lm = losses.combine(losses.transfusion_sums(logits, pred, jax.numpy.asarray(eps - x0,
                                                np.float32), jb), 1.0)["loss_lm"]
    np.testing.assert_allclose(float(metrics["loss_lm"]), float(lm), rtol=1e-5)
