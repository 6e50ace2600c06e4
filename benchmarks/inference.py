"""Inference benchmark: cached vs. recomputed diffusion steps, and seconds per image.

  python -m benchmarks.inference [--out=benchmarks/results/inference.json] [--repeats=5]
      [--no-reference | --reference-python=PY]

Shape `cpu-s`: width 512, depth 8, 8 heads, vocab 1024, latent 16x16x4 with patch 2
(P = 64 patches of dim 16). CFG on (2 rows per image). A step is one diffusion step
of one image; "cached" runs the P patches against the KV cache of a prefix of L
tokens, "recompute" runs the whole sequence (prefix + image) through the model.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tfusion.config import diffusion_config, model_config
from tfusion.inference.diffusion_samplers import SamplerState
from tfusion.inference.engine import Engine
from tfusion.inference.generate import generate
from tfusion.inference.options import GenerationOptions, SpecialTokens
from tfusion.inference.steps import CacheColumns
from tfusion.model.transfusion import Transfusion

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import timed_calls  # noqa: E402  (benchmarks/timing.py, run as script or -m)

PREFIX_LENGTHS = (0, 256, 1024)
SPECIAL = SpecialTokens(pad=0, bos=1, eos=2, boi=3, eoi=4)


def cpu_s_config():
    c = model_config()
    c.update(vocab_size=1024, width=512, depth=8, num_heads=8, latent_height=16,
             latent_width=16, latent_channels=4, patch_size=2, timestep_embed_dim=64,
             scan_layers=False)
    return c


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() after one warm-up (compile) call."""
    return float(np.median(timed_calls(lambda _: fn(), 1, repeats)[0]))


def cached_step_seconds(engine, prefix: int, repeats: int) -> float:
    p, rows = engine.patches_per_image, 2
    cache = engine.new_cache(rows, prefix + p)
    if prefix:
        tokens = jnp.full((rows, prefix), 7, jnp.int32)
        pos = jnp.broadcast_to(jnp.arange(prefix, dtype=jnp.int32), (rows, prefix))
        block = CacheColumns(pos, jnp.ones((rows, prefix), jnp.int32), jnp.full((rows, prefix), -1))
        _, cache = engine.prefill(cache, tokens, block)
    block = CacheColumns(jnp.broadcast_to(prefix + jnp.arange(p, dtype=jnp.int32), (rows, p)),
                  jnp.ones((rows, p), jnp.int32), jnp.full((rows, p), prefix, jnp.int32))
    sched = engine.schedule(250)
    keys = engine.keys([0])
    x = SamplerState.start(jnp.zeros((1,) + engine.latent_shape))
    state = {"cache": cache}

    def step():
        out, state["cache"] = engine.diffusion_step(
            state["cache"], x, jnp.int32(100), keys, jnp.zeros(1, jnp.int32), block, sched,
            jnp.float32(3.0), sampler="ddpm", guided=True, clip=None)
        return out

    return timed(step, repeats)


def recompute_step_seconds(model, prefix: int, repeats: int) -> float:
    cfg, p, rows = model.cfg, model.patches_per_image, 2
    length = prefix + p
    batch = dict(tokens=jnp.full((rows, length), 7, jnp.int32),
                 segment_ids=jnp.ones((rows, length), jnp.int32),
                 positions=jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length)),
                 image_index=jnp.broadcast_to(
                     jnp.where(jnp.arange(length) >= prefix, jnp.arange(length) - prefix, -1),
                     (rows, length)).astype(jnp.int32),
                 image_start=jnp.full((rows, 1), prefix, jnp.int32))
    images = jnp.zeros((rows, 1, cfg.latent_height, cfg.latent_width, cfg.latent_channels))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, b, x, t: nnx.merge(graphdef, s)(b, x, t)[1])
    t = jnp.full((rows, 1), 100, jnp.int32)
    return timed(lambda: forward(state, batch, images, t), repeats)


def image_seconds(engine, steps_per_call: int = 0) -> tuple[float, float, float]:
    """Seconds for one 250-step CFG image after compilation, the same in process CPU
    seconds (both cores; a load-independent proxy on a shared machine), and the
    first call's seconds including compilation. steps_per_call 0: the K steps as one
    compiled program (the default); 1: one jitted call per step."""
    prompt = [np.asarray([SPECIAL.bos] + list(range(10, 22)) + [SPECIAL.boi], np.int32)]
    options = GenerationOptions(max_new_tokens=0, max_images=0, steps=250, cfg_scale=3.0,
                                steps_per_call=steps_per_call)
    start = time.perf_counter()
    generate(engine, [prompt], SPECIAL, options, seeds=[0])
    first = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), time.process_time()
    generate(engine, [prompt], SPECIAL, options, seeds=[1])
    return time.perf_counter() - start, time.process_time() - cpu_start, first


def reference_image_seconds(python: str) -> dict:
    """The peer's one-image timing, in its own process (torch and jax never share one);
    its last stdout line is JSON."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          "reference_quality_pytorch.py")
    proc = subprocess.run([python, script, "--image-seconds", "--shape", "cpu-s", "--steps",
                           "250", "--cfg-scale", "3"], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"the reference failed ({proc.returncode}); it needs torch and "
                           "transfusion-pytorch (pip install -e '.[reference]'), or pass "
                           f"--no-reference\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/inference.json")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the transfusion-pytorch image timing")
    parser.add_argument("--reference-python",
                        default=os.environ.get("TFUSION_REFERENCE_PYTHON", sys.executable))
    args = parser.parse_args()
    load_before = os.getloadavg()
    cfg = cpu_s_config()
    model = Transfusion(cfg, rngs=nnx.Rngs(0))
    engine = Engine(model, diffusion_config())
    cached = [cached_step_seconds(engine, n, args.repeats) for n in PREFIX_LENGTHS]
    recompute = [recompute_step_seconds(model, n, args.repeats) for n in PREFIX_LENGTHS]
    image_s, image_cpu_s, first_s = image_seconds(engine)
    step_by_step_s, step_by_step_cpu_s, _ = image_seconds(engine, steps_per_call=1)
    result = dict(
        shape="cpu-s", model=dict(width=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads,
                                  vocab_size=cfg.vocab_size, patches_per_image=64, patch_dim=16),
        prefix_lengths=list(PREFIX_LENGTHS), step_s_cached=cached, step_s_recompute=recompute,
        image_s=image_s, image_cpu_s=image_cpu_s, image_s_first_call_with_compile=first_s,
        image_s_step_by_step=step_by_step_s, image_cpu_s_step_by_step=step_by_step_cpu_s,
        image_s_ratio_step_by_step_over_compiled=step_by_step_s / image_s,
        image_settings=dict(steps=250, cfg_scale=3.0, rows=2, sampler="ddpm"),
        machine=dict(platform=platform.platform(), processor=platform.processor(),
                     cpu_count=os.cpu_count(), jax=jax.__version__,
                     devices=[str(d) for d in jax.devices()],
                     load_average_before=load_before, load_average_after=os.getloadavg()),
        command=" ".join([os.path.basename(sys.executable), "-m", "benchmarks.inference"] + sys.argv[1:]),
    )
    if not args.no_reference:  # after tfusion's timings, so the two never overlap
        ref = reference_image_seconds(args.reference_python)
        result.update(reference_image_s=ref["image_s"], reference_image_cpu_s=ref["image_cpu_s"],
                      reference_image_settings=ref["settings"],
                      image_s_ratio_reference_over_tfusion=ref["image_s"] / image_s)
        result["machine"].update(torch=ref["torch_version"], torch_threads=ref["torch_threads"],
                                 load_average_after_reference=os.getloadavg())
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
