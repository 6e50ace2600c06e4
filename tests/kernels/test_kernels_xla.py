"""The dense XLA attention (the CPU default and the flash kernels' reference) against
a float64 numpy forward and against JAX autodiff of a plain softmax attention, since
its backward is written by hand (tfusion/attention.py)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers.packed_batches import attention_problem
from tfusion import attention


def numpy_attention(q, k, v, allowed):
    """float64 softmax attention; a query with no allowed key averages all values."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    allowed = np.asarray(allowed)[:, None]
    no_key = ~allowed.any(-1, keepdims=True)
    logits = np.where(allowed | no_key, logits, -np.inf)
    logits = np.where(no_key, 0.0, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


def autodiff_attention(q, k, v, info):
    """The same attention with JAX deriving the backward (where + jax.nn.softmax)."""
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = jnp.where(attention.mask_from_info(info)[:, None], logits,
                       jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def grads(kernel, q, k, v, info, cotangent):
    loss = lambda q, k, v: jnp.sum(kernel(q, k, v, info).astype(jnp.float32) * cotangent)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("seed,heads,kv_heads", [(0, 4, 4), (1, 4, 2), (2, 6, 1), (3, 2, 2)])
def test_values_and_grads(seed, heads, kv_heads):
    q, k, v, info, real, _ = attention_problem(seed, 48, heads, kv_heads)
    got = attention.xla_attention(q, k, v, info)
    want = numpy_attention(q, k, v, attention.mask_from_info(info))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=1e-5)
    # Padding queries included: their (uniform) rows must pass the same gradients.
    cotangent = jax.random.normal(jax.random.key(seed + 100), q.shape)
    for name, g, w in zip("qkv", grads(attention.xla_attention, q, k, v, info, cotangent),
                          grads(autodiff_attention, q, k, v, info, cotangent)):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=2e-5,
                                   err_msg=f"d{name}")
    assert not real.all()  # the problem has padding queries


def test_bfloat16_inputs_keep_their_dtype():
    q, k, v, info, _, cotangent = attention_problem(4, 40, 4, 2, dtype=jnp.bfloat16)
    got = attention.xla_attention(q, k, v, info)
    assert got.dtype == jnp.bfloat16
    want = numpy_attention(q, k, v, attention.mask_from_info(info))
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2, rtol=3e-2)
    dq, dk, dv = grads(attention.xla_attention, q, k, v, info, cotangent)
    assert (dq.dtype, dk.dtype, dv.dtype) == (jnp.bfloat16,) * 3
    assert all(bool(jnp.isfinite(g.astype(jnp.float32)).all()) for g in (dq, dk, dv))


def test_decoding_queries_equal_the_rows_of_the_full_pass():
    """A KV-cache step: the last queries against all keys equal those rows of the
    full attention (q_* ids sliced, kv_* ids whole)."""
    q, k, v, info, _, _ = attention_problem(5, 48, 4, 2)
    tail = 12
    q_side = {f.name: getattr(info, f.name)[:, -tail:] for f in dataclasses.fields(info)
              if f.name.startswith("q_")}
    step_info = dataclasses.replace(info, **q_side)
    full = attention.xla_attention(q, k, v, info)
    step = attention.xla_attention(q[:, -tail:], k, v, step_info)
    np.testing.assert_allclose(np.asarray(step), np.asarray(full[:, -tail:]), atol=1e-6)
