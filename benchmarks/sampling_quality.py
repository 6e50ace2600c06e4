"""Steps to quality: the shapes generation score and FID against sampling steps, per
sampler and guidance interval, on a trained run; and seconds per image.

    python benchmarks/sampling_quality.py --workdir /tmp/tfusion_shapes_tiny
        # the README run's checkpoint; ~25 min on 2 cores
    python benchmarks/sampling_quality.py --workdir DIR --smoke   # 2 configs, 8 prompts

For every (sampler, spacing, steps, guidance interval) in the grid: the run's EMA
params generate one image for each of the first 64 held-out captions, twice (sampling
seeds 0 and 1), CFG at the config's scale. Each image is read by the shapes suite's
exact detector (generation score: colour / shape / size / position accuracy per
prompted object; `generation_mean` = the mean of the four, averaged over the two
seeds; `seed_spread` = |seed 0 - seed 1|), and the 128 images of both seeds get an FID
against 128 held-out real images in the shapes feature space (tfusion/eval/fid.py).

The detector's score saturates on a well-trained run (a 16 px scene with one shape is
read right from very few steps), so two finer measures come with it:
  pixel_rmse_to_scene  per-image RMSE (pixels in [-1, 1]) between the image and the
                       held-out scene its caption describes, mean over both seeds;
  ode_error            deterministic samplers (ddim, dpmpp_2m) solve the same
                       probability-flow ODE from the same x_T (a row's noise depends
                       only on its seed): per-image RMSE of the seed-0 images against
                       a 1000-step DDIM solve with the same guidance interval, the
                       solver's own error. None for the ancestral ddpm sampler.

Time per image, two ways:
  image_s        this model (batch of 64 prompts per call, CFG rows doubled) on the
                 second seed's pass (the first one compiles), seconds / 64;
  image_s_cpu_s  one image at the cpu-s inference shape (benchmarks/inference.py:
                 width 512, depth 8, 64 patches of dim 16, random weights), compiled
                 sampler, median of --repeats; what a user of a bigger model waits.

Writes benchmarks/results/sampling_quality.json (one row per configuration) and
docs/sampling_quality.png. Resumable: rows already in --out are kept and skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

STEPS = (250, 100, 50, 25, 15, 10, 5)
# (sampler, spacing): the paper's ancestral DDPM and DDIM on its even spacing; the
# multistep solver on the trailing spacing (few-step levels) and on the even one.
SAMPLERS = (("ddpm", "linspace"), ("ddim", "linspace"), ("dpmpp_2m", "trailing"),
            ("dpmpp_2m", "linspace"))
ALL_LEVELS = (0.0, 1.0)
# Sampling seeds of the two passes; prompt i of a pass uses seed + i, so the passes
# share no seed.
SEEDS = (0, 1000)
DETERMINISTIC = ("ddim", "dpmpp_2m")
ODE_REFERENCE_STEPS = 1000


def _rmse(images, references) -> float:
    """Mean over images of each image's RMSE against its reference."""
    diff = np.asarray(images, np.float64) - np.asarray(references, np.float64)
    return float(np.mean(np.sqrt(np.mean(np.square(diff), axis=(1, 2, 3)))))


def _key(row) -> tuple:
    return (row["sampler"], row["spacing"], row["steps"], tuple(row["cfg_interval"]))


def _score(images, refs) -> dict:
    from tfusion.eval.shapes_detector import detect_batch
    from tfusion.eval.shapes_scoring import ATTRIBUTES, Claim, aggregate, score_image

    found = detect_batch(images)
    stated = [[Claim.from_spec(a) for a in r.attributes] for r in refs]
    agg = aggregate([score_image(s, [Claim.from_detection(d) for d in f])
                     for s, f in zip(stated, found)])
    return dict(mean_attribute=float(np.mean([agg[a] for a in ATTRIBUTES])),
                exact=float(agg["exact"]), **{a: float(agg[a]) for a in ATTRIBUTES})


class RunSampler:
    """The trained run's model, its held-out prompts and the FID reference stats."""

    def __init__(self, workdir: str, prompts: int, batch_size: int):
        from data_pipelines.tokenizer import build_tokenizer
        from experiments import registry
        from tfusion.eval import fid as fid_lib
        from tfusion.eval.checkpoints import load_config, load_model
        from tfusion.eval.fid_features import shapes_feature_fn
        from tfusion.eval.references import heldout_references

        name = load_config(workdir).get("name", "")
        defaults = registry.get_config(name) if name in registry.EXPERIMENTS else None
        self.model, self.config, self.step = load_model(workdir, None,
                                                        load_config(workdir, defaults))
        self.tokenizer = build_tokenizer(self.config)
        self.refs = heldout_references(self.config, prompts)
        self.batch_size = batch_size
        self.features = shapes_feature_fn(self.config.data.image_size)
        real = np.stack([r.image for r in heldout_references(self.config, 2 * prompts)])
        self.real_stats = fid_lib.stats_of_images([real], self.features)
        self.scenes = real[:prompts]  # the held-out scene each prompt describes
        self._ode_references = {}


    def images(self, sampler, spacing, steps, interval, seed) -> tuple[np.ndarray, float]:
        from tfusion.eval.checkpoints import override_sampling
        from tfusion.inference.model_sampler import ModelSampler, SamplingSettings

        override_sampling(self.config, sampler, spacing, interval)
        settings = SamplingSettings(batch_size=self.batch_size, steps=steps, seed=seed)
        model_sampler = ModelSampler(self.model, self.config, self.tokenizer, settings)
        start = time.perf_counter()
        images = model_sampler.images([r.caption for r in self.refs])
        return images, time.perf_counter() - start

    def ode_reference(self, interval) -> np.ndarray:
        """Seed-0 images of a 1000-step DDIM solve (the ODE's solution, to within its
        own error) with this guidance interval."""
        key = tuple(interval)
        if key not in self._ode_references:
            self._ode_references[key] = self.images("ddim", "linspace", ODE_REFERENCE_STEPS,
                                                    interval, SEEDS[0])[0]
        return self._ode_references[key]

    def row(self, sampler, spacing, steps, interval) -> dict:
        from tfusion.eval import fid as fid_lib

        scores, seconds, all_images = [], [], []
        for seed in SEEDS:
            images, s = self.images(sampler, spacing, steps, interval, seed)
            scores.append(_score(images, self.refs))
            seconds.append(s)
            all_images.append(images)
        fid = fid_lib.frechet_distance(
            fid_lib.stats_of_images([np.concatenate(all_images)], self.features), self.real_stats)
        means = [s["mean_attribute"] for s in scores]
        ode_error = None
        if sampler in DETERMINISTIC:
            ode_error = _rmse(all_images[0], self.ode_reference(interval))
        return dict(sampler=sampler, spacing=spacing, steps=steps, cfg_interval=list(interval),
                    generation_mean=float(np.mean(means)), seed_spread=float(abs(means[0] - means[1])),
                    exact_mean=float(np.mean([s["exact"] for s in scores])),
                    per_seed=scores, fid=float(fid),
                    pixel_rmse_to_scene=float(np.mean([_rmse(im, self.scenes)
                                                       for im in all_images])),
                    ode_error=ode_error,
                    image_s=seconds[1] / len(self.refs), first_pass_s=seconds[0])


def cpu_s_image_seconds(configs, repeats: int) -> dict:
    """One CFG image at the cpu-s inference shape per (sampler, spacing, steps,
    interval): the compiled sampler, median of `repeats` after a warm-up."""
    import jax
    from flax import nnx

    from benchmarks.inference import SPECIAL, cpu_s_config
    from tfusion.config import diffusion_config
    from tfusion.inference.engine import Engine
    from tfusion.inference.generate import generate
    from tfusion.inference.options import GenerationOptions
    from tfusion.model.transfusion import Transfusion

    engine = Engine(Transfusion(cpu_s_config(), rngs=nnx.Rngs(0)), diffusion_config())
    prompt = [np.asarray([SPECIAL.bos] + list(range(10, 22)) + [SPECIAL.boi], np.int32)]
    out = {}
    for sampler, spacing, steps, interval in configs:
        options = GenerationOptions(max_new_tokens=0, max_images=0, steps=steps, cfg_scale=3.0,
                                    sampler=sampler, spacing=spacing, cfg_interval=interval)
        run = lambda: jax.block_until_ready(
            generate(engine, [prompt], SPECIAL, options, [0])[0].images[0])
        run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        out[(sampler, spacing, steps, tuple(interval))] = float(np.median(times))
        print(f"[cpu-s] {sampler}/{spacing} {steps} steps interval {interval}: "
              f"{out[(sampler, spacing, steps, tuple(interval))]:.3f} s", flush=True)
    return out


def _machine() -> dict:
    import jax

    return dict(cpu_count=os.cpu_count(), platform=platform.platform(),
                jax_version=jax.__version__, load_average=list(os.getloadavg()))


def plot(rows, path: str, reference: dict | None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    series = {}
    for r in rows:
        interval = tuple(r["cfg_interval"])
        label = f"{r['sampler']} {r['spacing']}" + ("" if interval == ALL_LEVELS else
                                                    f", CFG on s in [{interval[0]:g}, {interval[1]:g}]")
        series.setdefault(label, []).append(r)
    for label, points in sorted(series.items()):
        points = sorted(points, key=lambda r: r["steps"])
        steps = [p["steps"] for p in points]
        axes[0].errorbar(steps, [p["generation_mean"] for p in points],
                         yerr=[p["seed_spread"] / 2 for p in points], marker="o", label=label,
                         capsize=2)
        axes[1].plot(steps, [p["pixel_rmse_to_scene"] for p in points], marker="o", label=label)
        if points[0]["ode_error"] is not None:
            axes[2].plot(steps, [p["ode_error"] for p in points], marker="o", label=label)
    names = ("generation score (mean attribute accuracy)", "pixel RMSE to the prompt's scene",
             f"ODE error (RMSE vs {ODE_REFERENCE_STEPS}-step DDIM, same x_T)")
    axes[2].set_yscale("log")
    for ax, name in zip(axes, names):
        ax.set_xscale("log")
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    if reference is not None:
        axes[0].axhline(reference["generation_mean"], color="grey", ls="--", lw=1,
                        label="250-step DDPM")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.suptitle("Steps to quality on the README run (64 held-out prompts x 2 seeds, CFG 3)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown_table(result: dict) -> str:
    """One row per configuration: scores, errors and time (docs/diffusion.md)."""
    ref = result.get("reference_250_ddpm")
    lines = ["| sampler | spacing | CFG interval | steps | generation (spread) | exact | "
             "pixel RMSE to scene | ODE error | FID | image s (README model) | "
             "image s (cpu-s) | cpu-s time / 250-step DDPM |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = next((r.get("image_s_cpu_s") for r in result["rows"] if r["sampler"] == "ddpm"
                 and r["steps"] == 250 and tuple(r["cfg_interval"]) == ALL_LEVELS), None)
    for r in result["rows"]:
        within = ref is not None and abs(r["generation_mean"] - ref["generation_mean"]) <= max(
            ref["seed_spread"], r["seed_spread"])
        cpu = r.get("image_s_cpu_s")
        lines.append(
            f"| {r['sampler']} | {r['spacing']} | {tuple(r['cfg_interval'])} | {r['steps']} | "
            f"{r['generation_mean']:.3f} ({r['seed_spread']:.3f}){'' if within else ' *'} | "
            f"{r['exact_mean']:.3f} | {r['pixel_rmse_to_scene']:.4f} | "
            f"{'-' if r['ode_error'] is None else format(r['ode_error'], '.4f')} | "
            f"{r['fid']:.1f} | {r['image_s']:.3f} | "
            f"{'-' if cpu is None else format(cpu, '.2f')} | "
            f"{'-' if cpu is None or not base else format(cpu / base, '.3f')} |")
    return "\n".join(lines) + ("\n\n* outside the 250-step DDPM score's seed spread" if ref else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True, help="a finished shapes run (the README job)")
    ap.add_argument("--out", default=os.path.join(_HERE, "results", "sampling_quality.json"))
    ap.add_argument("--plot", default=os.path.join(_ROOT, "docs", "sampling_quality.png"))
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--interval", default="0.0,0.95",
                    help="the guidance interval (lo,hi in noise level s) of the 'with "
                         "interval' rows; every configuration also runs without one")
    ap.add_argument("--samplers", default=",".join(f"{a}:{b}" for a, b in SAMPLERS))
    ap.add_argument("--steps", default=",".join(map(str, STEPS)))
    ap.add_argument("--repeats", type=int, default=3, help="cpu-s timing repeats")
    ap.add_argument("--no_cpu_s", action="store_true", help="skip the cpu-s timings")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--table", action="store_true",
                    help="print the markdown table of --out (docs/diffusion.md) and exit")
    args = ap.parse_args()
    if args.table:
        with open(args.out) as f:
            print(markdown_table(json.load(f)))
        return

    interval = tuple(float(v) for v in args.interval.split(","))
    samplers = [tuple(s.split(":")) for s in args.samplers.split(",")]
    steps = [int(s) for s in args.steps.split(",")]
    if args.smoke:
        samplers, steps, args.prompts, args.repeats = samplers[2:3], [10, 5], 8, 1
    intervals = [ALL_LEVELS] + ([interval] if interval != ALL_LEVELS else [])
    configs = [(s, sp, k, i) for s, sp in samplers for k in steps for i in intervals]

    result = dict(benchmark="sampling_quality", rows=[])
    if os.path.exists(args.out) and not args.smoke:
        with open(args.out) as f:
            result = json.load(f)
    done = {_key(r) for r in result["rows"]}
    runner = RunSampler(args.workdir, args.prompts, args.batch_size)
    for sampler, spacing, k, i in configs:
        if (sampler, spacing, k, i) in done:
            continue
        start = time.perf_counter()
        row = runner.row(sampler, spacing, k, i)
        result["rows"].append(row)
        print(f"{sampler:9s} {spacing:9s} {k:4d} steps interval {i}: generation "
              f"{row['generation_mean']:.3f} (spread {row['seed_spread']:.3f}) exact "
              f"{row['exact_mean']:.3f} fid {row['fid']:.2f} rmse {row['pixel_rmse_to_scene']:.4f} "
              f"ode {row['ode_error'] if row['ode_error'] is None else round(row['ode_error'], 4)} "
              f"image_s {row['image_s']:.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        _write(result, args, runner, intervals)
    if not args.no_cpu_s:
        missing = [c for c in configs if not any(_key(r) == c and "image_s_cpu_s" in r
                                                  for r in result["rows"])]
        timed = cpu_s_image_seconds(missing, args.repeats)
        for r in result["rows"]:
            if _key(r) in timed:
                r["image_s_cpu_s"] = timed[_key(r)]
    _write(result, args, runner, intervals)


def _write(result, args, runner, intervals) -> None:
    rows = sorted(result["rows"], key=lambda r: (r["sampler"], r["spacing"],
                                                 tuple(r["cfg_interval"]), -r["steps"]))
    reference = next((r for r in rows if r["sampler"] == "ddpm" and r["steps"] == 250
                      and tuple(r["cfg_interval"]) == ALL_LEVELS), None)
    result.update(
        rows=rows, command=shlex.join([sys.executable.split("/")[-1]] + sys.argv),
        time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), machine=_machine(),
        run=dict(workdir=args.workdir, step=runner.step, config=runner.config.get("name"),
                 cfg_scale=float(runner.config.diffusion.cfg_scale),
                 prediction=runner.config.diffusion.prediction),
        prompts=args.prompts, seeds=list(SEEDS),
        score="shapes generation score: mean of colour / shape / size / position accuracy "
              "per prompted object (exact detector), mean of seeds 0 and 1",
        fid="FID of the 2 x prompts generated images vs as many held-out real images (the "
            "first of them are the prompts' own scenes), shapes feature net "
            "(tfusion/eval/fid_features.py); at this sample size FID is biased upwards, "
            "compare rows only")
    if reference is not None:
        result["reference_250_ddpm"] = dict(generation_mean=reference["generation_mean"],
                                            seed_spread=reference["seed_spread"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    if args.plot and not args.smoke:
        plot(rows, args.plot, reference)


if __name__ == "__main__":
    main()
