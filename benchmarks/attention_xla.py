"""The dense XLA attention (the CPU path) against its previous form, and what it buys
the README job's train step.

    python benchmarks/attention_xla.py [--rounds 5] [--no-train-step]

`previous` is the formulation tfusion used until 2026-12-05, kept here as the
baseline: a [B, L, Hkv, G, Dh] einsum, where + jax.nn.softmax, JAX's autodiff for the
backward. `current` is tfusion.attention.xla_attention: head-major 4-D einsums and a
hand-written backward. Shapes: the README job (shapes_tiny: 8 rows of 256, 6 heads of
32), the training benchmark's cpu-s fixed and mix batches (8 heads of 64), and one
cached diffusion step at cpu-s (2 CFG rows, 64 patch queries against a 1088-key
cache; forward only). Masks come from real packed layouts (documents, images,
padding). Each figure is the median of `rounds` interleaved timings (previous,
current, previous, ...), each the best of 3 calls, so drift on this shared machine
hits both alike. Then, unless --no-train-step, the README job's whole
`Trainer.step_fn` with either attention, interleaved the same way on the same batches.
Writes benchmarks/results/attention_xla.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tfusion import attention, kernels  # noqa: E402

DEFAULT_OUT = os.path.join(_HERE, "results", "attention_xla.json")


def previous_attention(q, k, v, info, *, scale=None):
    """tfusion's XLA attention before 2026-12-05 (the baseline)."""
    b, lq, h, dh = q.shape
    hkv = k.shape[2]
    scale = dh ** -0.5 if scale is None else scale
    grouped = q.reshape(b, lq, hkv, h // hkv, dh)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", grouped, k,
                        preferred_element_type=jnp.float32) * scale
    logits = jnp.where(attention.mask_from_info(info)[:, None, None], logits,
                       jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhgqk,bkhd->bqhgd", probs, v).reshape(b, lq, h, dh)


def packed_info(rows: int, length: int, doc: int, image_at: int, patches: int):
    """Rows of `doc`-long documents, each with one image of `patches` at `image_at`,
    the row's tail (length % doc) padding."""
    pos = np.arange(length)
    seg = np.where(pos < length - length % doc, pos // doc + 1, 0)
    in_doc = pos % doc
    idx = np.where((in_doc >= image_at) & (in_doc < image_at + patches) & (seg > 0),
                   (pos // doc) * patches + in_doc - image_at, -1)
    seg, idx = (jnp.asarray(np.broadcast_to(a, (rows, length)), jnp.int32) for a in (seg, idx))
    return attention.MaskInfo.from_batch(seg, idx, patches)


def decode_info(rows: int, prefix: int, patches: int):
    """The KV-cache step: `patches` queries of one image after a `prefix` of text."""
    full = packed_info(rows, prefix + patches, prefix + patches, prefix, patches)
    return attention.MaskInfo(*(x[:, -patches:] for x in (full.q_segment_ids, full.q_slot,
                                                            full.q_index)),
                              full.kv_segment_ids, full.kv_slot, full.kv_index)


SHAPES = {  # name: (rows, q length, k length, heads, head_dim, info, backward?)
    "readme_8x256_h6x32": (8, 256, 256, 6, 32, lambda: packed_info(8, 256, 60, 20, 16), True),
    "cpu_s_fixed_16x120_h8x64": (16, 120, 120, 8, 64, lambda: packed_info(16, 120, 120, 54, 64), True),
    "cpu_s_mix_10x320_h8x64": (10, 320, 320, 8, 64, lambda: packed_info(10, 320, 150, 60, 64), True),
    "cpu_s_decode_2x64_keys1088": (2, 64, 1088, 8, 64, lambda: decode_info(2, 1024, 64), False),
}


def best_of(fn, args, calls: int = 3) -> float:
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def kernel_timings(rounds: int) -> dict:
    out = {}
    for name, (rows, lq, lk, heads, dh, make_info, backward) in SHAPES.items():
        info = make_info()
        keys = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(keys[0], (rows, lq, heads, dh))
        k, v = (jax.random.normal(key, (rows, lk, heads, dh)) for key in keys[1:3])
        cotangent = jax.random.normal(keys[3], q.shape)
        fns = {}
        for label, kernel in (("previous", previous_attention), ("current", attention.xla_attention)):
            fns[label, "forward"] = jax.jit(lambda q, k, v, kernel=kernel: kernel(q, k, v, info))
            if backward:
                loss = lambda q, k, v, kernel=kernel: jnp.sum(kernel(q, k, v, info) * cotangent)
                fns[label, "forward_backward"] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        for fn in fns.values():
            jax.block_until_ready(fn(q, k, v))  # compile
        samples = {key: [] for key in fns}
        for _ in range(rounds):
            for key, fn in fns.items():
                samples[key].append(best_of(fn, (q, k, v)))
        entry = {"shape": dict(rows=rows, q_len=lq, k_len=lk, heads=heads, head_dim=dh)}
        for (label, part), times in samples.items():
            entry[f"{part}_ms_{label}"] = 1e3 * statistics.median(times)
        for part in ("forward", "forward_backward"):
            if f"{part}_ms_current" in entry:
                entry[f"{part}_speedup"] = entry[f"{part}_ms_previous"] / entry[f"{part}_ms_current"]
        out[name] = entry
        print(name, {k: round(v, 3) for k, v in entry.items() if k != "shape"}, flush=True)
    return out


def train_step_timing(rounds: int, steps_per_round: int = 8) -> dict:
    """shapes_tiny's Trainer.step_fn built once with each attention, same batches."""
    from experiments.registry import get_config
    from launch.train_setup import make_trainer
    from tfusion.train import distributed, state as state_lib

    config = get_config("shapes_tiny")
    runs = {}
    for label, kernel in (("previous", previous_attention), ("current", attention.xla_attention)):
        kernels.KERNELS["xla"] = kernel  # read when the step is traced, on its first call
        trainer = make_trainer(config, tempfile.mkdtemp())
        batches_it = trainer._iterator(trainer.train_iterator_fn)
        batches = [distributed.global_batch(next(batches_it), trainer.mesh, trainer.table)
                   for _ in range(steps_per_round)]
        _, state = state_lib.init_state(config.model, trainer.tx, trainer.mesh, trainer.table,
                                        config.train.seed, trainer.state_sh)
        state, _ = trainer.step_fn(state, batches[0])
        jax.block_until_ready(state)
        runs[label] = dict(trainer=trainer, state=state, batches=batches, step_s=[])
    kernels.KERNELS["xla"] = attention.xla_attention
    for _ in range(rounds):
        for run in runs.values():
            start = time.perf_counter()
            for batch in run["batches"]:
                run["state"], metrics = run["trainer"].step_fn(run["state"], batch)
            jax.block_until_ready((run["state"], metrics))
            run["step_s"].append((time.perf_counter() - start) / steps_per_round)
    result = {f"step_s_{label}": run["step_s"] for label, run in runs.items()}
    result.update({f"step_s_median_{label}": statistics.median(run["step_s"])
                   for label, run in runs.items()})
    result["step_speedup"] = result["step_s_median_previous"] / result["step_s_median_current"]
    print("readme train step", {k: v for k, v in result.items() if "median" in k or "speedup" in k})
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-train-step", action="store_true")
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()
    load_start = os.getloadavg()
    result = dict(
        command=" ".join(["python", "benchmarks/attention_xla.py"] + [shlex.quote(a) for a in sys.argv[1:]]),
        time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(),
                     jax=jax.__version__, load_average_start=load_start),
        kernels=kernel_timings(args.rounds))
    if not args.no_train_step:
        result["readme_train_step"] = train_step_timing(args.rounds)
    result["machine"]["load_average_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
