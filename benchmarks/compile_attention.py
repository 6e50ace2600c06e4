"""AOT-compile Transfusion attention (forward + backward) for a TPU topology on CPU.

  PYTHONPATH=. /work/venv-tpu/bin/python benchmarks/compile_attention.py \\
      --topology=v5p:2x2x1 --rows_per_device=4 [--train_step]

Needs libtpu (the separate venv /work/venv-tpu: pip install 'jax[tpu]'); no TPU is
used: jax.experimental.topologies gives abstract v5p devices and XLA:TPU/Mosaic
compile for them. For each kernel ("xla" dense reference, "flash_tpu") it
records the compiled per-device memory of value_and_grad of one attention call
at the 7B config's shapes (32 heads x 128, seq 4096), and with --train_step of
the whole 7B train step (launch/compile.py's compile_step with the kernel
swapped in). Writes benchmarks/results/compile/attention_7b_v5p.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # quiets libtpu's host probe
# No TPU is claimed, so several AOT compiles (other engineers') may share libtpu.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def memory(compiled) -> dict:
    mem = compiled.memory_analysis()
    peak = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes + mem.generated_code_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return dict(per_device_memory_bytes=int(peak), temp_bytes=int(mem.temp_size_in_bytes),
                argument_bytes=int(mem.argument_size_in_bytes),
                compiled_flops=float(cost.get("flops", 0.0)) if cost else None)


def packed_info(rows: int, seq_len: int, patches: int):
    """A realistic packed MaskInfo (documents with images), shapes only matter for AOT
    but the values keep the program honest when run."""
    from benchmarks.block_sparsity import synthetic_batch
    from tfusion.attention import MaskInfo

    batch = synthetic_batch(np.random.default_rng(0), rows, seq_len, patches)
    return MaskInfo.from_batch(batch["segment_ids"], batch["image_index"], patches)


def compile_attention(kernel: str, mesh, rows: int, seq_len: int, heads: int, head_dim: int):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from tfusion import kernels, sharding

    table = sharding.rule_table()
    batch_axes = ("data", "fsdp")
    act = NamedSharding(mesh, P(batch_axes, None, "tensor", None))
    ids = NamedSharding(mesh, P(batch_axes, None))
    x = jax.ShapeDtypeStruct((rows, seq_len, heads, head_dim), jnp.bfloat16, sharding=act)
    info = packed_info(1, seq_len, 256)
    info = jax.tree.map(lambda a: jax.ShapeDtypeStruct((rows, seq_len), a.dtype, sharding=ids),
                        info)

    def loss(q, k, v, info):
        with sharding.activation_sharding(mesh, table):
            out = kernels.dot_product_attention(q, k, v, info, kernel=kernel)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return step.lower(x, x, x, info).compile()


def compile_train_step(kernel: str, devices):
    from experiments.paper import paper_config
    from launch.compile import compile_step

    config = paper_config("7B")
    config.model.attention_kernel = kernel
    compiled, mesh = compile_step(config, devices)
    return compiled, config, mesh


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--topology", default="v5p:2x2x1")
    parser.add_argument("--rows_per_device", type=int, default=4)
    parser.add_argument("--train_step", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/compile/attention_7b_v5p.json")
    args = parser.parse_args()

    from jax.experimental import topologies

    from tfusion import kernels, sharding

    # On this CPU host the default backend is cpu, which would pick interpret mode:
    # compile the real Mosaic kernel for the TPU target instead.
    kernels.KERNELS["flash_tpu"] = kernels.flash_kernel(
        kernels.FlashSettings("tpu", 128, 128, False))
    devices = topologies.get_topology_desc(topology_name=args.topology, platform="tpu").devices
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)
    rows = args.rows_per_device * len(devices)
    result = dict(topology=args.topology, device_kind=devices[0].device_kind,
                  devices=len(devices), mesh=dict(mesh.shape),
                  attention_shapes=dict(rows=rows, seq_len=4096, heads=32, head_dim=128,
                                        dtype="bfloat16", what="value_and_grad of one call"),
                  attention={}, command=" ".join(["PYTHONPATH=.", sys.executable] + sys.argv))
    for kernel in ("xla", "flash_tpu"):
        start = time.time()
        compiled = compile_attention(kernel, mesh, rows, 4096, 32, 128)
        result["attention"][kernel] = dict(memory(compiled),
                                           compile_seconds=round(time.time() - start, 1))
        print(kernel, result["attention"][kernel], flush=True)
    if args.train_step:
        result["train_step_7B"] = {}
        for kernel in ("xla", "flash_tpu"):
            start = time.time()
            compiled, config, step_mesh = compile_train_step(kernel, devices)
            result["train_step_7B"][kernel] = dict(
                memory(compiled), compile_seconds=round(time.time() - start, 1),
                mesh=dict(step_mesh.shape), batch_rows=config.train.batch_size,
                remat_policy=config.model.remat_policy)
            print("train step", kernel, result["train_step_7B"][kernel], flush=True)
    result["note"] = ("compiled_flops is XLA's per-device count: Pallas custom calls count 0 "
                      "and a scanned layer body counts once")
    result["per_device_memory_bytes"] = {
        k: v["per_device_memory_bytes"] for k, v in result["attention"].items()}
    if args.train_step:
        result["train_step_per_device_memory_bytes"] = {
            k: v["per_device_memory_bytes"] for k, v in result["train_step_7B"].items()}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
