"""The whole Transfusion loss and its gradients with a flash kernel selected by config."""
import jax
import numpy as np
from flax import nnx

from tests.helpers.packed_batches import random_batch, tiny_config
from tfusion.model.transfusion import Transfusion
from tfusion.train.step import Objective


def _loss_and_grads(kernel: str, batch):
    config = tiny_config(attention_kernel=kernel)
    graphdef, params = nnx.split(Transfusion(config.model, rngs=nnx.Rngs(0)))
    objective = Objective(graphdef, config)
    grad_fn = jax.jit(jax.value_and_grad(objective.loss, has_aux=True))
    (loss, _), grads = grad_fn(params, batch, jax.random.key(1))
    return loss, grads


def test_model_loss_and_grads_match_with_flash_gpu_kernel():
    batch, _, _ = random_batch(5, tiny_config().model, batch_size=2, seq_len=32, max_images=2)
    want_loss, want_grads = _loss_and_grads("xla", batch)
    got_loss, got_grads = _loss_and_grads("flash_gpu", batch)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)
