"""Every remat policy gives the loss and gradients of the plain (no remat) model."""
import jax
import numpy as np
import pytest
from flax import nnx

from tests.helpers.packed_batches import random_batch, tiny_config
from tfusion.model.transformer import REMAT_POLICIES
from tfusion.model.transfusion import Transfusion
from tfusion.train.step import Objective
from tfusion.train.params import init_params


def loss_and_grads(remat_policy):
    config = tiny_config(remat_policy=remat_policy)
    batch, _, _ = random_batch(0, config.model, batch_size=2, seq_len=32, max_images=2)
    graphdef, params = init_params(config.model, None, None, seed=0)
    objective = Objective(graphdef, config)
    fn = jax.jit(jax.value_and_grad(lambda p: objective.loss(p, batch, jax.random.key(1))[0]))
    return fn(params)


@pytest.mark.parametrize("policy", [p if p == "full" else pytest.param(p, marks=pytest.mark.slow)
                                    for p in REMAT_POLICIES if p != "none"])
def test_remat_policy_matches_no_remat(policy):
    loss, grads = loss_and_grads("none")
    r_loss, r_grads = loss_and_grads(policy)
    np.testing.assert_allclose(r_loss, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(r_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_save_attention_out_names_a_residual():
    """The policy is only meaningful if the block tags the tensor it names."""
    config = tiny_config()
    batch, _, _ = random_batch(0, config.model, batch_size=1, seq_len=32, max_images=2)
    model = Transfusion(config.model, rngs=nnx.Rngs(0))
    jaxpr = jax.make_jaxpr(lambda b: model(b, b["images"], b["image_t_max"]))(batch)
    assert "attention_out" in str(jaxpr)
