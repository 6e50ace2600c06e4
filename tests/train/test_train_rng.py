"""The run's random streams are independent: training noise is not a copy of the init.

Reference: rank correlation. A normal draw and a truncated-normal draw from the
same key are both increasing functions of the same uniform bits, so a weight
initialised from the key a train step later draws its noise from is perfectly
rank-correlated with that noise (Spearman rho = 1), whatever the weight's scale.
Independent draws of 256 values give |rho| ~ 0.06.
"""
import jax
import jax.numpy as jnp
import numpy as np

from tests.helpers.train_fixtures import synthetic_config
from tfusion import diffusion, sharding
from tfusion.train import optimizer, state as state_lib


def _ranks(x):
    return np.argsort(np.argsort(x)).astype(np.float64)


def _spearman(a, b):
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def test_train_step_noise_is_independent_of_every_initial_weight():
    config = synthetic_config()
    config.model.update(depth=4, latent_height=8, latent_width=8, latent_channels=4)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    table = sharding.rule_table()
    tx = optimizer.make_optimizer(config.optimizer)
    shardings = state_lib.train_state_shardings(config.model, tx, mesh, table)
    _, state = state_lib.init_state(config.model, tx, mesh, table, 0, shardings)

    m = config.model
    images = jnp.zeros((1, 1, m.latent_height, m.latent_width, m.latent_channels))
    process = diffusion.NoiseProcess(config.diffusion)
    noises = []
    for step in range(m.depth + 2):  # the steps whose keys once equalled layer keys
        draw = process.draw(state_lib.step_key(state["rng"], jnp.int32(step)), images,
                            jnp.full((1, 1), 999, jnp.int32))
        noises.append(np.asarray(draw.noisy).ravel())  # = s * noise, s > 0: same ranks
    n = noises[0].size

    pieces = []  # every initial weight array, and each layer's slice of a stacked one
    for path, leaf in jax.tree_util.tree_leaves_with_path(state["params"]):
        leaf = np.asarray(leaf)
        slices = [leaf] + (list(leaf) if leaf.ndim >= 2 else [])
        pieces += [(jax.tree_util.keystr(path), s.ravel()[:n]) for s in slices
                   if s.size >= n and np.unique(s.ravel()[:n]).size == n]  # random ones
    assert len(pieces) > 10
    worst = max(((abs(_spearman(noise, w)), name, step) for name, w in pieces
                 for step, noise in enumerate(noises)), key=lambda t: t[0])
    assert worst[0] < 0.5, f"step {worst[2]}'s noise tracks the initial {worst[1]}: rho {worst[0]:.3f}"


def test_stream_keys_differ_by_name_and_follow_the_seed():
    from tfusion.train.params import stream_keys

    a, b = stream_keys(0), stream_keys(1)
    data = {k: tuple(np.asarray(jax.random.key_data(v))) for k, v in a.items()}
    assert len(set(data.values())) == len(data) == 3
    assert all(data[k] != tuple(np.asarray(jax.random.key_data(b[k]))) for k in a)
