"""A bare JAX train step at a benchmark shape: the ceiling tfusion's step is held to.

Plain jax.numpy, no framework: token embedding, `depth` pre-norm blocks (RMSNorm,
fused QKV, dense causal softmax attention, fused SwiGLU gate/up), LM head and
cross-entropy at every position, Adam written out, params donated. It computes
what tfusion's text path computes (without images, masks of packed documents,
clipping or non-finite checks), so its executed-FLOP MFU measured in the same run
says how close to this machine's attainable rate the framework's step comes.

    python benchmarks/bare_jax_step.py --shape cpu-s   # prints one JSON line
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]

import workloads  # noqa: E402
from timing import timed_calls  # noqa: E402


def init_params(key, shape: workloads.Shape):
    import jax
    import jax.numpy as jnp

    d, h = shape.width, shape.mlp_hidden
    keys = iter(jax.random.split(key, 2 + 4 * shape.depth))

    def dense(shape_in_out):
        return jax.random.normal(next(keys), shape_in_out, jnp.float32) / shape_in_out[0] ** 0.5

    layers = [dict(norm1=jnp.ones(d), qkv=dense((d, 3 * d)), out=dense((d, d)),
                   norm2=jnp.ones(d), gate_up=dense((d, 2 * h)), down=dense((h, d)))
              for _ in range(shape.depth)]
    return dict(embed=dense((shape.vocab, d)), layers=layers, final_norm=jnp.ones(d),
                head=dense((d, shape.vocab)))


def forward_loss(params, tokens, shape: workloads.Shape):
    import jax
    import jax.numpy as jnp

    b, length = tokens.shape
    heads, head_dim = shape.heads, shape.width // shape.heads

    def rms(x, scale):
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale

    causal = jnp.tril(jnp.ones((length, length), bool))
    x = params["embed"][tokens]
    for p in params["layers"]:
        qkv = (rms(x, p["norm1"]) @ p["qkv"]).reshape(b, length, 3, heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / head_dim ** 0.5
        probs = jax.nn.softmax(jnp.where(causal, scores, -1e30), axis=-1)
        attn = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, shape.width)
        x = x + attn @ p["out"]
        gate, up = jnp.split(rms(x, p["norm2"]) @ p["gate_up"], 2, axis=-1)
        x = x + (jax.nn.silu(gate) * up) @ p["down"]
    logits = rms(x, params["final_norm"]) @ params["head"]
    targets = jnp.roll(tokens, -1, axis=1)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return jnp.mean(nll)


def make_step(shape: workloads.Shape, lr: float = 1e-4, b1: float = 0.9, b2: float = 0.95):
    import jax
    import jax.numpy as jnp

    def step(state, tokens):
        params, m, v, t = state
        loss, grads = jax.value_and_grad(forward_loss)(params, tokens, shape)
        t = t + 1
        m = jax.tree.map(lambda a, g: b1 * a + (1 - b1) * g, m, grads)
        v = jax.tree.map(lambda a, g: b2 * a + (1 - b2) * g * g, v, grads)
        scale = lr * jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        params = jax.tree.map(lambda p, a, s: p - scale * a / (jnp.sqrt(s) + 1e-8), params, m, v)
        return (params, m, v, t), loss

    return jax.jit(step, donate_argnums=0)


def run(shape: workloads.Shape, rows: int, seq_len: int, warmup: int, steps: int,
        peak: float, seed: int = 0) -> dict:
    """Median step time and executed-FLOP MFU (XLA's cost analysis of the step)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    params = init_params(jax.random.key(seed), shape)
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = (params, zeros, jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32))
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, shape.vocab, (rows, seq_len)),
                         jnp.int32)
    step = make_step(shape)
    compiled = step.lower(state, tokens).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    executed = float(cost["flops"])
    holder = {"state": state}

    def call(_):
        holder["state"], loss = compiled(holder["state"], tokens)
        return loss

    times, _, loss = timed_calls(call, warmup, steps)
    median = statistics.median(times)
    return dict(rows=rows, seq_len=seq_len, step_s_median=median, step_s=times,
                tokens_per_s=rows * seq_len / median, executed_flops_per_step=executed,
                mfu_executed=executed / median / peak, final_loss=float(loss))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="cpu-s", choices=sorted(workloads.SHAPES))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    from matmul_peak import measure_peak_flops

    shape = workloads.SHAPES[args.shape]
    peak = measure_peak_flops()
    seq_len = workloads.useful_tokens(workloads.fixed_samples(shape, 1)[0], shape)
    print(json.dumps(dict(run(shape, shape.batch, seq_len, args.warmup, args.steps, peak),
                          peak_flops=peak)))


if __name__ == "__main__":
    main()
