"""Empty image slots cost nothing: train-step time of a batch with half its image slots
empty against a full one, with the modality layers on every slot (before:
data.image_capacity_per_row = 0) and on the images present (after: capacity = the
images per row of the half-empty batch) -> benchmarks/results/image_capacity.json.

  python benchmarks/image_capacity.py [--steps=8] [--layer=unet]

The model is a CPU-sized Transfusion with the paper's U-Net modality layers (latents
16x16x4, patch 2 -> 64 patches; U-Net channels 128, 256), M = 8 slots per row, 8 rows
of 1024 positions: full rows hold 8 captioned images, half-empty rows 4 (the rest
text), so the transformer sees the same number of positions in both. The step is the
jitted loss + gradient of tfusion.train.step.Objective (what training differentiates),
timed with benchmarks/timing.py after warm-up; medians of `steps` calls; the three
cases run interleaved round by round so machine noise hits them alike. XLA's cost
analysis gives each compiled step's FLOPs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timing import cpu_model, timed_calls, write_result  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ROWS, SEQ, SLOTS = 8, 1024, 8


def _config(layer: str, capacity: float):
    import ml_collections

    from tfusion.config import diffusion_config, model_config

    m = model_config()
    m.update(vocab_size=512, width=256, depth=4, num_heads=4, latent_height=16,
             latent_width=16, latent_channels=4, patch_size=2, timestep_embed_dim=64,
             modality_layer=layer, dtype="float32", scan_layers=False)
    if layer == "unet":
        m.unet_channels = (128, 256)
    train = ml_collections.ConfigDict(dict(batch_size=ROWS, grad_accum_steps=1))
    data = ml_collections.ConfigDict(dict(image_capacity_per_row=capacity))
    return ml_collections.ConfigDict(dict(model=m, diffusion=diffusion_config(), train=train,
                                          data=data))


def _batch(images_per_row: int, seed: int = 0):
    """ROWS rows of one document each: images_per_row captioned images, then text to
    fill the row (so both batches have SEQ real positions per row)."""
    from tfusion.batch import BatchSpec, ImageSegment, assemble_rows

    rng = np.random.default_rng(seed)
    spec = BatchSpec(ROWS, SEQ, SLOTS, (16, 16, 4), 2)
    rows = []
    for _ in range(ROWS):
        doc, used = [], 0
        for _ in range(images_per_row):
            doc.append(rng.integers(6, 512, 8).astype(np.int32))  # caption + BOI
            doc.append(ImageSegment(rng.normal(size=(16, 16, 4)).astype(np.float32), 999))
            used += 8 + spec.patches_per_image
        doc.append(rng.integers(6, 512, SEQ - used).astype(np.int32))
        rows.append([doc])
    return assemble_rows(rows, spec, 0)


def _step(layer: str, capacity: float):
    import jax
    from flax import nnx

    from tfusion.model.transfusion import Transfusion
    from tfusion.train.step import Objective

    config = _config(layer, capacity)
    graphdef, params = nnx.split(Transfusion(config.model, rngs=nnx.Rngs(0)))
    objective = Objective(graphdef, config)

    @jax.jit
    def loss_and_grads(p, batch, rng):
        return jax.value_and_grad(lambda q: objective.loss(q, batch, rng)[0])(p)

    return loss_and_grads, params


def main():
    import jax

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--layer", default="unet")
    parser.add_argument("--out", default=os.path.join(RESULTS, "image_capacity.json"))
    args = parser.parse_args()
    full, half = _batch(SLOTS), _batch(SLOTS // 2)
    cases = {  # name: (capacity per row, batch)
        "before_full": (0.0, full), "before_half_empty": (0.0, half),
        "after_half_empty": (SLOTS / 2, half)}
    steps, flops, times = {}, {}, {name: [] for name in cases}
    for name, (capacity, batch) in cases.items():
        fn, params = _step(args.layer, capacity)
        batch = {k: jax.numpy.asarray(v) for k, v in batch.items()}
        compiled = fn.lower(params, batch, jax.random.key(0)).compile()
        flops[name] = float(compiled.cost_analysis().get("flops", 0.0))
        steps[name] = (compiled, params, batch)
    for _ in range(args.steps):  # round by round: noise hits every case alike
        for name, (compiled, params, batch) in steps.items():
            t, _, _ = timed_calls(lambda i: compiled(params, batch, jax.random.key(i)), 1, 1)
            times[name] += t
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "command": " ".join(["python", *sys.argv]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "processor": cpu_model(), "jax": jax.__version__},
        "model": {"layer": args.layer, "width": 256, "depth": 4, "latent": [16, 16, 4],
                  "patch_size": 2, "unet_channels": [128, 256] if args.layer == "unet" else None,
                  "rows": ROWS, "seq_len": SEQ, "slots_per_row": SLOTS},
        "median_step_s": medians, "step_s": times, "compiled_flops": flops,
        "ratios": {
            "before_half_empty / before_full": medians["before_half_empty"] / medians["before_full"],
            "after_half_empty / before_half_empty":
                medians["after_half_empty"] / medians["before_half_empty"],
            "after_half_empty / before_full": medians["after_half_empty"] / medians["before_full"],
            "flops after_half_empty / before_half_empty":
                flops["after_half_empty"] / flops["before_half_empty"]},
    }
    print(json.dumps({"median_step_s": medians, "ratios": result["ratios"]}, indent=1))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
