"""Block-sparse flash kernels (Pallas, interpret mode on CPU) against xla_attention.

Random packed batches (several documents, images, padding) with GQA; forward
and dq, dk, dv. Padding queries differ by design (flash outputs 0, xla a uniform
average), so outputs and cotangents are compared on real queries only.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers.packed_batches import attention_problem
from tfusion import attention, kernels
from tfusion.kernels.flash import FlashSettings, flash_attention


def _value_and_grads(kernel, q, k, v, info, cotangent):
    def loss(q, k, v):
        return jnp.sum(kernel(q, k, v, info).astype(jnp.float32) * cotangent)
    out = kernel(q, k, v, info)
    return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def check_against_reference(settings, seed, seq_len, heads, kv_heads, dtype=jnp.float32,
                            tol=2e-5):
    q, k, v, info, real, ct = attention_problem(seed, seq_len, heads, kv_heads, dtype=dtype)
    flash = functools.partial(flash_attention, settings=settings)
    want, want_grads = _value_and_grads(attention.xla_attention, q, k, v, info, ct)
    got, got_grads = _value_and_grads(flash, q, k, v, info, ct)
    f32 = lambda x: np.asarray(x, np.float32)
    np.testing.assert_allclose(f32(got) * real, f32(want) * real, atol=tol, rtol=tol)
    assert np.all(f32(got)[~np.broadcast_to(real, got.shape)] == 0), "padding must be 0"
    for name, g, w in zip("qkv", got_grads, want_grads):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(f32(g), f32(w), atol=tol * 4, rtol=tol * 4,
                                   err_msg=f"d{name}")


# Lq = 40 is not a block multiple (exercises padding); 4 query heads on 2 kv heads = GQA.
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("seed,block_q,block_k", [(0, 16, 16), (1, 8, 16)])
def test_flash_matches_reference(backend, seed, block_q, block_k):
    check_against_reference(FlashSettings(backend, block_q, block_k, interpret=True),
                            seed, seq_len=40, heads=4, kv_heads=2)


def test_flash_bfloat16():
    check_against_reference(FlashSettings("gpu", 16, 16, interpret=True), 3, seq_len=32,
                            heads=2, kv_heads=1, dtype=jnp.bfloat16, tol=3e-2)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("seed", range(2, 6))
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 1), (6, 2)])
def test_flash_sweep(backend, seed, heads, kv_heads):
    check_against_reference(FlashSettings(backend, 16, 8, interpret=True), seed,
                            seq_len=64, heads=heads, kv_heads=kv_heads)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_flash_bfloat16_tpu_and_multiple_blocks(backend):
    check_against_reference(FlashSettings(backend, 8, 8, interpret=True), 7, seq_len=48,
                            heads=4, kv_heads=2, dtype=jnp.bfloat16, tol=3e-2)


def test_flash_gpu_lowers_to_triton():
    """No GPU here, but exporting for CUDA runs the real Pallas->Triton lowering of
    all three kernels (forward, dq, dk/dv); only PTX compilation is left untested."""
    from jax import export
    q, k, v, info, _, _ = attention_problem(0, 128, 4, 2, head_dim=64, dtype=jnp.bfloat16)
    settings = FlashSettings("gpu", 64, 64, interpret=False)

    def loss(q, k, v, info):
        return jnp.sum(flash_attention(q, k, v, info, settings=settings).astype(jnp.float32))

    target = "__gpu$xla.gpu.triton"
    exported = export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(target)])(
        q, k, v, info)
    assert exported.mlir_module().count(target) == 3


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (Triton, cuDNN)")
@pytest.mark.parametrize("kernel", ["flash_gpu", "cudnn"])
def test_gpu_compiled_kernels(kernel):
    q, k, v, info, real, ct = attention_problem(0, 256, 4, 2, head_dim=64, dtype=jnp.bfloat16)
    want = attention.xla_attention(q, k, v, info)
    got = kernels.dot_product_attention(q, k, v, info, kernel=kernel)
    np.testing.assert_allclose(np.asarray(got, np.float32) * real,
                               np.asarray(want, np.float32) * real, atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU (Mosaic)")
def test_tpu_compiled_kernel():
    q, k, v, info, real, ct = attention_problem(0, 512, 4, 2, head_dim=128, dtype=jnp.bfloat16)
    check = functools.partial(np.testing.assert_allclose, atol=3e-2, rtol=3e-2)
    want = attention.xla_attention(q, k, v, info)
    got = kernels.dot_product_attention(q, k, v, info, kernel="flash_tpu")
    check(np.asarray(got, np.float32) * real, np.asarray(want, np.float32) * real)
