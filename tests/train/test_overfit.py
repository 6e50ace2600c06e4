"""A tiny model memorises one fixed batch: both losses fall by at least 90%."""
import jax
import optax
import pytest

from tests.helpers.packed_batches import random_batch, tiny_config
from tfusion.train.step import Objective
from tfusion.train.params import init_params


@pytest.mark.parametrize("modality_layer", ["linear", pytest.param("unet", marks=pytest.mark.slow)])
def test_overfits_one_batch(modality_layer):
    config = tiny_config(width=64, num_heads=4, depth=2, modality_layer=modality_layer,
                         unet_channels=(32, 32))
    batch, _, _ = random_batch(0, config.model, batch_size=4, seq_len=32, max_images=2)
    graphdef, params = init_params(config.model, None, None, seed=0)
    objective = Objective(graphdef, config)
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)
    rng = jax.random.key(0)  # fixed t and noise: the diffusion target is memorisable

    @jax.jit
    def step(params, opt_state):
        (_, aux), grads = jax.value_and_grad(objective.loss, has_aux=True)(params, batch, rng)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, aux

    first = None
    for _ in range(300):
        params, opt_state, aux = step(params, opt_state)
        first = first or (float(aux["loss_lm"]), float(aux["loss_diffusion"]))
    last = float(aux["loss_lm"]), float(aux["loss_diffusion"])
    assert last[0] < 0.1 * first[0], (first, last)
    assert last[1] < 0.1 * first[1], (first, last)
