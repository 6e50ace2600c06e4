"""Autoencoder benchmark: reconstruction PSNR of trained tiny models + encode throughput.

  python -m benchmarks.autoencoders --vae_run=/tmp/ae_runs/vae --vq_run=/tmp/ae_runs/vq \\
      [--results=benchmarks/results/autoencoders.json]

Reads eval.json / metrics.jsonl of launch/train_autoencoder.py runs (PSNR measured
there on held-out shapes) and times jitted batched encoding (after one warm-up
call) of the trained VAE and of the paper's f8c8 architecture (random weights:
speed does not depend on them) at 256 px.
"""
from __future__ import annotations

import json
import os
import platform
import time

from absl import app, flags

_VAE_RUN = flags.DEFINE_string("vae_run", "/tmp/ae_runs/vae", "VAE workdir.")
_VQ_RUN = flags.DEFINE_string("vq_run", "/tmp/ae_runs/vq", "VQ-VAE workdir.")
_RESULTS = flags.DEFINE_string("results", "benchmarks/results/autoencoders.json", "Result JSON.")
_PAPER_BATCH = flags.DEFINE_integer("paper_batch", 2, "Batch for the 256 px f8c8 timing.")
_OTHER_RUNS = flags.DEFINE_list("other_runs", [], "More train_autoencoder workdirs to summarize "
                                "(e.g. ablations run with --config overrides).")


def encode_images_per_s(model, image_size: int, batch: int, repeats: int) -> float:
    import numpy as np

    from tfusion.autoencoders import jit_encode

    encode = jit_encode(model)
    images = np.random.default_rng(0).uniform(-1, 1, (batch, image_size, image_size, 3))
    images = images.astype(np.float32)
    encode(images).block_until_ready()  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        encode(images).block_until_ready()
    return batch * repeats / (time.perf_counter() - start)


def encode_latents_images_per_s(vae_dir: str, image_size: int, count: int) -> dict:
    """End to end launch.encode_latents (render shapes, prepare, encode, write shards)."""
    import tempfile

    from experiments.shapes import shapes_tiny
    from launch.encode_latents import encode_to_directory

    config = shapes_tiny()
    config.data.update(image_size=image_size, encoder="vae", encoder_path=vae_dir)
    with tempfile.TemporaryDirectory() as out:
        stats = encode_to_directory(config, out, splits=("train",), num_examples=count,
                                    batch_size=64)
    return {"images": count, "seconds_incl_compile": stats["seconds"],
            "images_per_s": stats["images_per_s"]}


def run_summary(workdir: str) -> dict:
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(workdir, "eval.json")) as f:
        results = json.load(f)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    return {"experiment": config["name"], "steps": last["step"],
            "batch_size": config["train"]["batch_size"],
            "image_size": config["data"]["image_size"],
            "autoencoder": config["autoencoder"], "final_train_psnr": last["psnr"],
            "train_images_per_s": last["images_per_s"], **results}


def main(argv) -> None:
    del argv
    import jax
    from flax import nnx

    from tfusion.autoencoders import AutoencoderConfig, AutoencoderKL, load_pretrained

    vae = run_summary(_VAE_RUN.value)
    vq = run_summary(_VQ_RUN.value)
    tiny = load_pretrained(os.path.join(_VAE_RUN.value, "autoencoder"))
    paper = AutoencoderKL(AutoencoderConfig(latent_channels=8), rngs=nnx.Rngs(0))
    result = {
        "host": {"machine": platform.processor() or platform.machine(),
                 "cpus": os.cpu_count(), "jax": jax.__version__,
                 "device": str(jax.devices()[0]),
                 "note": "CPU shared with other jobs (load ~15-20 on 2 cores): timings are "
                         "lower bounds of what this CPU does alone"},
        "vae_shapes_tiny": vae,
        "vq_shapes_tiny": vq,
        "other_runs": {os.path.basename(d.rstrip("/")): run_summary(d) for d in _OTHER_RUNS.value},
        "encode_throughput": {
            "vae_shapes_tiny_32px_batch32": encode_images_per_s(tiny, vae["image_size"], 32, 5),
            f"paper_f8c8_256px_batch{_PAPER_BATCH.value}": encode_images_per_s(
                paper, 256, _PAPER_BATCH.value, 1),
        },
        "encode_latents_end_to_end_32px": encode_latents_images_per_s(
            os.path.join(_VAE_RUN.value, "autoencoder"), vae["image_size"], 1024),
        "commands": {
            "vae": "python -m launch.train_autoencoder "
                   "--config=experiments/registry.py:vae_shapes_tiny --workdir=/tmp/ae_runs/vae",
            "vq": "python -m launch.train_autoencoder "
                  "--config=experiments/registry.py:vq_shapes_tiny --workdir=/tmp/ae_runs/vq",
            "benchmark": "python -m benchmarks.autoencoders --vae_run=/tmp/ae_runs/vae "
                         "--vq_run=/tmp/ae_runs/vq",
        },
    }
    os.makedirs(os.path.dirname(_RESULTS.value), exist_ok=True)
    with open(_RESULTS.value, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result["encode_throughput"]))


if __name__ == "__main__":
    app.run(main)
