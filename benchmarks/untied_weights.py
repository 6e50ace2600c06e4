"""Untied modality weights cost no duplicate compute: executed FLOPs and step time of
model.modality_weights="untied" against "shared" on the same batch
-> benchmarks/results/untied_weights.json.

  python benchmarks/untied_weights.py [--steps=8] [--skip_paper]

FLOPs: XLA's cost analysis of the jitted loss + gradient (tfusion.train.step.Objective),
compiled with scan_layers=False and model.untied_unroll=True, which unroll the layer
loop and the untied tile loop (the cost analysis counts a loop body once). Three forms per geometry: shared; untied,
routed in tiles (what training runs); untied by per-position select (both projections
everywhere: what routing avoids). Geometries:
  * shapes_tiny: the README model (width 192, depth 4, 16 patches per image) on 8 rows of
    256 positions with 6 captioned images each (~40% image positions), tile 128;
  * 0.16B: the paper's 0.16B block (width 768, 12 heads, 256 patches per image, linear
    modality layers) at depth 2 (the ratio is per layer; the embedding, head and image
    layers are the same in both), one row of 4096 positions holding 8 captioned images
    (half the positions), tile 128.
Time: medians of `steps` interleaved calls of the compiled shapes_tiny step (CPU): shared,
untied with the tile loop unrolled (the default) and as a lax.scan, and the per-position
select.
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
GEOMETRIES = {
    # name: model fields, rows, seq_len, images per row, caption tokens per image
    "shapes_tiny": (dict(vocab_size=514, width=192, depth=4, num_heads=6, latent_height=16,
                         latent_width=16, latent_channels=3, patch_size=4,
                         timestep_embed_dim=64), 8, 256, 6, 8),
    "0.16B": (dict(vocab_size=32_002, width=768, depth=2, num_heads=12, latent_height=32,
                   latent_width=32, latent_channels=8, patch_size=2), 1, 4096, 8, 16),
}


def _config(model: dict, rows: int, form: str, unroll: bool, tile: int = 128):
    import ml_collections

    from tfusion.config import diffusion_config, model_config

    m = model_config()
    m.update(model, dtype="float32", scan_layers=False, untied_tile=tile, untied_unroll=unroll,
             modality_weights="shared" if form == "shared" else "untied")
    train = ml_collections.ConfigDict(dict(batch_size=rows, grad_accum_steps=1))
    return ml_collections.ConfigDict(dict(model=m, diffusion=diffusion_config(), train=train))


def _batch(model: dict, rows: int, seq_len: int, images: int, caption: int, seed: int = 0):
    """Rows of one document: `images` captioned images, then text to the row's end."""
    from tfusion.batch import BatchSpec, ImageSegment, assemble_rows

    rng = np.random.default_rng(seed)
    latent = (model["latent_height"], model["latent_width"], model["latent_channels"])
    spec = BatchSpec(rows, seq_len, images, latent, model["patch_size"])
    out = []
    for _ in range(rows):
        doc, used = [], 0
        for _ in range(images):
            doc.append(rng.integers(6, model["vocab_size"] - 2, caption).astype(np.int32))
            doc.append(ImageSegment(rng.normal(size=latent).astype(np.float32), 999))
            used += caption + spec.patches_per_image
        doc.append(rng.integers(6, model["vocab_size"] - 2, seq_len - used).astype(np.int32))
        out.append([doc])
    return assemble_rows(out, spec, 0)


def _compiled(config, batch, form: str):
    import jax
    from flax import nnx

    from tfusion.model import transfusion as transfusion_lib
    from tfusion.train.step import Objective

    graphdef, params = nnx.split(transfusion_lib.Transfusion(config.model, rngs=nnx.Rngs(0)))
    objective = Objective(graphdef, config)

    @jax.jit
    def loss_and_grads(p, b, rng):
        return jax.value_and_grad(lambda q: objective.loss(q, b, rng)[0])(p)

    route = transfusion_lib.route_by_modality
    if form == "untied_select":  # both projections at every position, then a select
        transfusion_lib.route_by_modality = lambda m, tile, tiled=True: route(m, tile, False)
    try:
        compiled = loss_and_grads.lower(params, batch, jax.random.key(0)).compile()
    finally:
        transfusion_lib.route_by_modality = route
    return compiled, params


def main():
    import jax

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip_paper", action="store_true")
    parser.add_argument("--out", default=os.path.join(RESULTS, "untied_weights.json"))
    args = parser.parse_args()
    forms = ("shared", "untied", "untied_select")
    flops, image_share, timed = {}, {}, {}
    for geometry, (model, rows, seq_len, images, caption) in GEOMETRIES.items():
        if geometry == "0.16B" and args.skip_paper:
            continue
        batch = {k: jax.numpy.asarray(v)
                 for k, v in _batch(model, rows, seq_len, images, caption).items()}
        image_share[geometry] = float(np.mean(np.asarray(batch["image_index"]) >= 0))
        flops[geometry] = {}
        for form in forms:
            compiled, params = _compiled(_config(model, rows, form, unroll=True), batch, form)
            flops[geometry][form] = float(compiled.cost_analysis().get("flops", 0.0))
            print(geometry, form, f"{flops[geometry][form]:.4g} FLOPs", flush=True)
            if geometry == "shapes_tiny":
                timed[form] = (compiled, params, batch)
        if geometry == "shapes_tiny":  # model.untied_unroll=False: the tile loop scanned
            timed["untied_scan"] = (*_compiled(_config(model, rows, "untied", unroll=False),
                                               batch, "untied"), batch)
    times = {form: [] for form in timed}
    for _ in range(args.steps):  # round by round: noise hits every form alike
        for form, (compiled, params, batch) in timed.items():
            t, _, _ = timed_calls(lambda i: compiled(params, batch, jax.random.key(i)), 1, 1)
            times[form] += t
    medians = {form: statistics.median(t) for form, t in times.items()}
    result = {
        "command": " ".join(["python", *sys.argv]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "processor": cpu_model(), "jax": jax.__version__},
        "geometries": {g: dict(model=GEOMETRIES[g][0], rows=GEOMETRIES[g][1],
                               seq_len=GEOMETRIES[g][2], images_per_row=GEOMETRIES[g][3],
                               image_position_share=image_share[g], tile=128)
                       for g in flops},
        "compiled_flops": flops,
        "flops_ratios": {g: {f"{form} / shared": v[form] / v["shared"] for form in forms}
                         for g, v in flops.items()},
        "shapes_tiny_median_step_s": medians, "shapes_tiny_step_s": times,
        "shapes_tiny_time_ratios": {f"{form} / shared": medians[form] / medians["shared"]
                                    for form in medians},
    }
    print(json.dumps({k: result[k] for k in ("flops_ratios", "shapes_tiny_time_ratios")},
                     indent=1))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
