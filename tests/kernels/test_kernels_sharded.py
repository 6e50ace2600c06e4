"""Registered flash kernels through the dispatcher, sharded over a mesh of 8 devices."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from tests.helpers.packed_batches import tiny_config
from tests.helpers.packed_batches import attention_problem
from tfusion import kernels, sharding
from tfusion.config import ModelConfig


def test_kernels_are_registered_and_accepted_by_config():
    assert {"xla", "flash", "flash_tpu", "flash_gpu", "cudnn"} <= set(kernels.KERNELS)
    for name in ("flash", "flash_tpu", "flash_gpu"):
        ModelConfig.of(tiny_config(attention_kernel=name).model)


def test_flash_under_mesh_matches_reference():
    q, k, v, info, real, ct = attention_problem(0, 40, heads=4, kv_heads=2)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    table = sharding.rule_table()

    def run(kernel):
        def f(q, k, v, info):
            with sharding.activation_sharding(mesh, table):
                out = kernels.dot_product_attention(q, k, v, info, kernel=kernel)
                grads = jax.grad(lambda q, k, v: jnp.sum(kernels.dot_product_attention(
                    q, k, v, info, kernel=kernel) * ct), argnums=(0, 1, 2))(q, k, v)
            return out, grads
        heads = NamedSharding(mesh, P("data", None, "tensor", None))
        q_, k_, v_ = (jax.device_put(x, heads) for x in (q, k, v))
        return jax.jit(f)(q_, k_, v_, info)

    want, want_grads = run("xla")
    got, got_grads = run("flash_gpu")
    np.testing.assert_allclose(got * real, want * real, atol=2e-5, rtol=2e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
