"""Quality per CPU-minute: tfusion against lucidrains' transfusion-pytorch.

    python benchmarks/quality_vs_reference.py --workdir /tmp/qvr_run
                         # budgets 2,5,10 min (+ curve points 1,1.5,3,7.5); 25 min on 2 cores
    python benchmarks/quality_vs_reference.py --smoke --workdir /tmp/qvr_smoke
                         # budgets 0.5,1 min, 8 prompts; 3 min, writes only under --workdir

Both systems train on the same `shapes` data, one after the other on the same cores,
for the same training time, and are scored by the same exact detector on the same 64
held-out prompts (the shapes evaluation suite's generation score: colour / shape /
size / position accuracy per prompted object; "generation error" = 1 - their mean).

tfusion: `python -m launch.train --config=experiments/registry.py:shapes_tiny_quick`
(--tfusion-config; the README job's model: width 192, depth 4, 6 heads of 32, patch 4
on 16x16x3 pixels, DDPM v-prediction, EMA 0.999, lr 2e-3 cosine; trained like the peer
on caption -> image pairs only, with logit-normal diffusion times (mean 0.7); for
budgets of minutes 2 packed rows of 256 per step, 20 warm-up steps, 6000 steps;
`--tfusion-config shapes_tiny` runs the README job itself: 8 rows, 2000 steps, uniform
t, its mix of text-only documents and image-first pairs),
changed only so that nothing but training runs in the timed loop: no held-out
evaluations, sample grids or final scoring (eval_every=0, sample_every=0,
final_eval_suite=''), and a checkpoint every --checkpoint-every steps, all kept. Its
training time is metrics.jsonl's logged interval time summed (the first interval includes XLA
compilation; checkpoint writes are counted too). The run is stopped (SIGTERM) once
that passes the last budget; each budget maps to the last checkpoint reached within
it, scored from its EMA params by `python -m launch.evaluate --suite=shapes` (100
DDPM steps, CFG 3: the config's sampling settings).

The peer (benchmarks/reference_quality_pytorch.py, its own process, 2 torch threads):
same width/depth/heads/MLP size, the same images as 4x4 grids of 48-dim patches,
caption ids from tfusion's tokenizer, training pairs from the same scene generator
(shapes train split, index order shuffled by a fixed seed); its example's recipe
(Adam 3e-4, clip 0.5, batch 16 caption -> image samples, create_ema()), flow matching,
EMA snapshots at each budget, sampled with its defaults (16 ODE points, midpoint,
CFG 3). Its images are scored here with tfusion's detector and scoring code.

Besides the budgets, both systems are also scored at --curve-points (minutes) for the
plot and for time_ratio_vs_reference: the peer's time to its best score divided by
the time tfusion needs to reach that score (linear interpolation between measured
points). Writes benchmarks/results/quality_vs_reference.json and
docs/quality_vs_reference.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:  # run as a script: make the repo importable
    sys.path.insert(0, _ROOT)

from experiments import registry  # noqa: E402
from tfusion.config import llama_mlp_hidden  # noqa: E402
from tfusion.eval.shapes_detector import detect_batch  # noqa: E402
from tfusion.eval.shapes_scoring import ATTRIBUTES, Claim, aggregate, score_image  # noqa: E402

REFERENCE_PYTHON = os.environ.get("TFUSION_REFERENCE_PYTHON", sys.executable)
PEER_BATCH = 16  # samples per step in the peer's example (train_mnist.py)
TARGET_RATIO = 5.0  # issue 17: tfusion reaches the peer's best score in <= 1/5 its time
SCORE_KEYS = ATTRIBUTES + ("count", "exact")


def subprocess_env() -> dict:
    """The caller's environment without the tests' fake XLA devices (they split the
    cores; run_all.sh unsets them too)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def summarize(generation: dict) -> dict:
    """The suite's generation metrics -> the attribute accuracies, their mean and error."""
    out = {k: float(generation[k]) for k in SCORE_KEYS}
    out["mean_attribute"] = float(np.mean([out[a] for a in ATTRIBUTES]))
    out["generation_error"] = 1.0 - out["mean_attribute"]
    return out


# --- tfusion ---

def train_times(workdir: str) -> dict[int, float]:
    """step -> cumulative training seconds at that step, from metrics.jsonl's train rows
    (each logs the mean step time of the interval since the previous row)."""
    path = os.path.join(workdir, "metrics.jsonl")
    times, total, previous = {}, 0.0, 0
    if not os.path.exists(path):
        return times
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):  # a row being written right now
                break
            row = json.loads(line)
            if row.get("split") == "train" and "step_s" in row:
                total += row["step_s"] * (row["step"] - previous)
                previous = row["step"]
                times[row["step"]] = total
    return times


def train_tfusion(workdir: str, max_seconds: float, config_name: str, checkpoint_every: int,
                  overrides: tuple[str, ...] = ()) -> dict[int, float]:
    """A registry config with evaluation pauses off, a checkpoint every
    `checkpoint_every` steps (the resolution of the budget points) and
    `overrides` ("train.batch_size=4", ...) applied, stopped once it has trained
    max_seconds; returns step -> training seconds."""
    cmd = [sys.executable, "-m", "launch.train", f"--config=experiments/registry.py:{config_name}",
           f"--workdir={workdir}", "--config.train.eval_every=0",
           "--config.train.sample_every=0", "--config.train.final_eval_suite=",
           f"--config.train.log_every={checkpoint_every}",
           f"--config.train.checkpoint_every={checkpoint_every}",
           "--config.train.keep_checkpoints=100000"] + [f"--config.{o}" for o in overrides]
    print("[tfusion]", shlex.join(cmd), flush=True)
    with open(os.path.join(workdir, "train.log"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=_ROOT, env=subprocess_env(), stdout=log,
                                stderr=subprocess.STDOUT)
        while proc.poll() is None:
            time.sleep(2.0)
            times = train_times(workdir)
            if times and max(times.values()) >= max_seconds:
                proc.send_signal(signal.SIGTERM)  # it saves a checkpoint and exits
                proc.wait()
                break
    if proc.returncode:
        raise RuntimeError(f"tfusion training failed ({proc.returncode}); see {log.name}")
    times = train_times(workdir)
    print(f"[tfusion] stopped at step {max(times)}, {max(times.values()):.0f} s of training",
          flush=True)
    return times


def evaluate_tfusion(workdir: str, step: int, prompts: int) -> dict:
    """The shapes suite on checkpoint `step`'s EMA params, through the evaluate CLI."""
    cmd = [sys.executable, "-m", "launch.evaluate", f"--workdir={workdir}", "--suite=shapes",
           f"--step={step}", f"--shapes_prompts={prompts}", "--batch_size=64", "--no_progress"]
    proc = subprocess.run(cmd, cwd=_ROOT, env=subprocess_env(), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"evaluating step {step} failed ({proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    with open(os.path.join(workdir, "eval", "shapes.json")) as f:
        result = json.load(f)
    assert result["step"] == step, result["step"]
    return result["metrics"]


def tfusion_points(workdir: str, minutes: list[float], prompts: int, config_name: str,
                   checkpoint_every: int) -> tuple[list[dict], dict | None]:
    """Each point -> the last checkpoint within it, scored; also the suite's chance level."""
    os.makedirs(workdir, exist_ok=True)
    times = train_tfusion(workdir, 60.0 * max(minutes), config_name, checkpoint_every)
    checkpoints = {s: t for s, t in times.items() if s % checkpoint_every == 0}
    scored, points, chance = {}, [], None
    for m in minutes:
        within = [s for s, t in checkpoints.items() if t <= 60.0 * m]
        if not within:  # compilation alone took longer than this budget
            points.append(dict(minutes=m, steps=0, train_seconds=None, generation=None))
            continue
        step = max(within)
        if step not in scored:
            start = time.perf_counter()
            metrics = evaluate_tfusion(workdir, step, prompts)
            chance = summarize(metrics["generation_chance"])
            scored[step] = summarize(metrics["generation"])
            print(f"[tfusion] {m:g} min -> step {step}: mean attribute accuracy "
                  f"{scored[step]['mean_attribute']:.3f} ({time.perf_counter() - start:.0f} s "
                  "to score)", flush=True)
        points.append(dict(minutes=m, steps=step, train_seconds=checkpoints[step],
                           generation=scored[step]))
    return points, chance


# --- the peer ---

def write_peer_spec(config, references, minutes: list[float], workdir: str, seed: int) -> str:
    from data_pipelines.sources import SHAPES_SPLIT_SEEDS
    from data_pipelines.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(config)
    tokenizer_path = os.path.join(workdir, "tokenizer.model")
    with open(tokenizer_path, "wb") as f:
        f.write(tokenizer.model_proto)
    model, data = config.model, config.data
    prompts = [r.caption for r in references]
    spec = dict(
        seed=seed, order_seed=config.train.seed, minutes=minutes, batch_size=PEER_BATCH,
        tokenizer_model=tokenizer_path, num_text_tokens=model.vocab_size,
        train_seed=SHAPES_SPLIT_SEEDS["train"], num_examples=data.num_examples,
        max_shapes=data.shapes_max_per_image, image_size=data.image_size,
        patch_size=model.patch_size, width=model.width, depth=model.depth,
        heads=model.num_heads, head_dim=model.width // model.num_heads,
        mlp_hidden=model.mlp_hidden or llama_mlp_hidden(model.width),
        prompts=prompts, prompt_ids=[tokenizer.encode(p) for p in prompts])
    path = os.path.join(workdir, "peer_spec.json")
    with open(path, "w") as f:
        json.dump(spec, f, indent=1)
    return path


def run_peer(spec_path: str, out_dir: str, python: str) -> dict:
    cmd = [python, os.path.join(_HERE, "reference_quality_pytorch.py"), "--spec", spec_path,
           "--out", out_dir]
    print("[peer]", shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=_ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                          stderr=None, text=True)  # its progress lines go to our stderr
    if proc.returncode:
        raise RuntimeError(f"the peer failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def score_images(images: np.ndarray, references) -> dict:
    """The shapes suite's generation score of `images` for the references' prompts."""
    stated = [[Claim.from_spec(a) for a in r.attributes] for r in references]
    found = detect_batch(images)
    per_image = [score_image(s, [Claim.from_detection(d) for d in f])
                 for s, f in zip(stated, found)]
    return summarize(aggregate(per_image))


def peer_points(result: dict, references) -> list[dict]:
    points = []
    for p in result["points"]:
        generation = score_images(np.load(p["images"], allow_pickle=False), references)
        print(f"[peer] {p['minutes']:g} min, step {p['steps']}: mean attribute accuracy "
              f"{generation['mean_attribute']:.3f}", flush=True)
        points.append(dict(minutes=p["minutes"], steps=p["steps"],
                           train_seconds=p["train_seconds"], pairs_seen=p["pairs_seen"],
                           loss_last_100=p["loss_last_100"],
                           sample_seconds=p["sample_seconds"], generation=generation))
    return points


# --- comparison ---

def tfusion_time_to_reach(points: list[dict], target: float):
    """(seconds, how) at which tfusion's scored points first reach `target`: linear
    interpolation between the two points around the crossing; at or before the first
    point only its time is known (an upper bound); None if never reached."""
    previous = None
    for p in points:
        if p["generation"] is None:
            continue
        t, score = p["train_seconds"], p["generation"]["mean_attribute"]
        if score >= target:
            if previous is None:
                return t, "reached by tfusion at its first measured point (its time is an " \
                          "upper bound, so the ratio is a lower bound)"
            t0, s0 = previous
            return t0 + (target - s0) * (t - t0) / (score - s0), "interpolated"
        previous = (t, score)
    return None, "not reached by tfusion within its measured points"


def compare(tfusion: list[dict], peer: list[dict]) -> dict:
    best = max(peer, key=lambda p: p["generation"]["mean_attribute"])  # earliest on ties
    target = best["generation"]["mean_attribute"]
    seconds, how = tfusion_time_to_reach(tfusion, target)
    ratio = None if seconds is None else best["train_seconds"] / seconds
    if ratio is None:
        met = False
    elif ratio >= TARGET_RATIO:
        met = True
    else:  # a lower bound under the target decides nothing
        met = False if how == "interpolated" else None
    return dict(time_ratio_vs_reference=ratio, how=how,
                reference_best_mean_attribute=target,
                reference_seconds_to_best=best["train_seconds"],
                reference_minutes_point_of_best=best["minutes"],
                tfusion_seconds_to_reference_best=seconds,
                target=f"tfusion reaches the peer's best score in <= 1/{TARGET_RATIO:g} of the "
                       "peer's training time (ratio >= 5)",
                target_met=met)


def plot(path: str, tfusion: list[dict], peer: list[dict], chance: dict | None,
         budgets: list[float], prompts: int, tfusion_config: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, points, style in ((f"tfusion ({tfusion_config}, JAX)", tfusion, "o-"),
                                ("transfusion-pytorch 0.20.0", peer, "s-")):
        shown = [p for p in points if p["generation"] is not None]
        ax.plot([p["train_seconds"] / 60 for p in shown],
                [p["generation"]["mean_attribute"] for p in shown], style, label=name)
    if chance is not None:
        ax.axhline(chance["mean_attribute"], color="grey", ls="--", lw=1,
                   label="chance (prompt vs another scene)")
    for b in budgets:
        ax.axvline(b, color="lightgrey", lw=0.8, zorder=0)
    ax.set_xlabel("training wall-clock minutes (2 CPU cores)")
    ax.set_ylabel("generation: mean attribute accuracy")
    ax.set_ylim(0, 1)
    ax.set_xlim(0, max(budgets) * 1.03)
    ax.set_title(f"shapes, {prompts} held-out prompts (colour/shape/size/position)")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def at_budgets(budgets: list[float], tfusion: list[dict], peer: list[dict]) -> list[dict]:
    by_minutes = lambda points: {p["minutes"]: p for p in points}
    tf, pe = by_minutes(tfusion), by_minutes(peer)
    return [dict(minutes=b, tfusion=tf[b], reference=pe[b]) for b in budgets]


def machine_info() -> dict:
    import jax

    model = platform.processor()
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f
                      if line.startswith("model name")), model)
    return dict(cpu_model=model, cpu_count=os.cpu_count(), jax_version=jax.__version__,
                python=platform.python_version(), platform=platform.platform())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="2,5,10", help="minutes of training time")
    parser.add_argument("--curve-points", default="1,1.5,3,7.5",
                        help="extra minutes scored for the plot and the ratio")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="the peer's torch seed")
    parser.add_argument("--workdir", default=None,
                        help="runs, checkpoints, peer images (~2 GB), kept; default: a temp "
                             "dir, deleted at the end unless --smoke")
    parser.add_argument("--out", default=os.path.join(_HERE, "results",
                                                      "quality_vs_reference.json"))
    parser.add_argument("--plot", default=os.path.join(_ROOT, "docs",
                                                       "quality_vs_reference.png"))
    parser.add_argument("--reference-python", default=REFERENCE_PYTHON)
    parser.add_argument("--tfusion-config", default="shapes_tiny_quick",
                        help="registry entry tfusion trains (shapes_tiny: the README job)")
    parser.add_argument("--checkpoint-every", type=int, default=100,
                        help="tfusion steps between checkpoints (~10 s at 2 rows per step)")
    parser.add_argument("--smoke", action="store_true",
                        help="budgets 0.5,1 min, 8 prompts, outputs under --workdir")
    args = parser.parse_args()
    delete_workdir = args.workdir is None and not args.smoke
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="tfusion_quality_vs_reference_")
    if args.smoke:
        args.budgets, args.curve_points, args.prompts = "0.5,1", "", 8
        args.out = os.path.join(args.workdir, "quality_vs_reference.json")
        args.plot = os.path.join(args.workdir, "quality_vs_reference.png")
    budgets = [float(b) for b in args.budgets.split(",")]
    minutes = sorted(set(budgets) | {float(m) for m in args.curve_points.split(",") if m})
    if os.path.exists(os.path.join(args.workdir, "tfusion")):
        parser.error(f"{args.workdir} holds an earlier run; pass another --workdir")

    from tfusion.eval.references import heldout_references

    config = registry.get_config(args.tfusion_config)
    # The shapes suite's own prompts: the first held-out scenes (eval seed).
    references = heldout_references(config, args.prompts)
    os.makedirs(args.workdir, exist_ok=True)
    spec_path = write_peer_spec(config, references, minutes, args.workdir, args.seed)
    load = {"before": os.getloadavg()}

    tfusion, chance = tfusion_points(os.path.join(args.workdir, "tfusion"), minutes, args.prompts,
                                     args.tfusion_config, args.checkpoint_every)
    load["after_tfusion"] = os.getloadavg()
    peer_result = run_peer(spec_path, os.path.join(args.workdir, "peer"), args.reference_python)
    peer = peer_points(peer_result, references)
    load["after"] = os.getloadavg()

    comparison = compare(tfusion, peer)
    machine = dict(machine_info(), torch_version=peer_result["torch_version"],
                   torch_threads=peer_result["torch_threads"], load_average=load)
    result = dict(
        benchmark="quality_vs_reference",
        command=shlex.join(["python", "benchmarks/quality_vs_reference.py", *sys.argv[1:]]),
        time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), machine=machine,
        score="shapes suite generation score on the first held-out prompts: per prompted "
              "object colour / shape / size / position accuracy (count and exact per image); "
              "mean_attribute = mean of the four, generation_error = 1 - mean_attribute",
        prompts=args.prompts, budgets_minutes=budgets, points_minutes=minutes,
        settings=dict(
            tfusion=dict(config=f"experiments/registry.py:{args.tfusion_config}", overrides=dict(
                eval_every=0, sample_every=0, final_eval_suite="", log_every=args.checkpoint_every,
                checkpoint_every=args.checkpoint_every, keep_checkpoints=100000),
                batch=f"{config.train.batch_size} packed rows x {config.data.seq_len} tokens",
                data=f"text-only token share {config.data.text_token_share}, image-first "
                     f"pair fraction {config.data.image_first_fraction} (0 and 0: caption "
                     "-> image pairs only, as the peer)",
                schedule=f"lr {config.optimizer.learning_rate} cosine over {config.train.steps} "
                         f"steps, {config.optimizer.warmup_steps} warm-up",
                diffusion=f"{config.diffusion.process}, {config.diffusion.prediction}-prediction, "
                          f"t {config.diffusion.timestep_sampling}"
                          + (f" (mean {config.diffusion.logit_normal_mean}, std "
                             f"{config.diffusion.logit_normal_std})"
                             if config.diffusion.timestep_sampling == "logit_normal" else ""),
                params=f"EMA ({config.train.ema_decay})",
                sampler=f"{config.diffusion.sampler}, {config.diffusion.sample_steps} steps, "
                        f"CFG {config.diffusion.cfg_scale}",
                train_seconds="sum of metrics.jsonl interval times up to the checkpoint "
                              "(XLA compilation and checkpoint writes included)"),
            reference=dict(library="transfusion-pytorch 0.20.0",
                           params=peer_result["params"],
                           processing_strategy=peer_result["processing_strategy"],
                           recipe="Adam lr 3e-4, grad clip 0.5, batch 16 caption -> image "
                                  "samples, flow matching (its default), create_ema() "
                                  "(beta 0.99)",
                           sampler="EMA model, sample_many(force_modality_at_start=(0, (4, 4))), "
                                   "16 ODE points (midpoint, 30 model evaluations), CFG 3",
                           train_seconds="sum of step times (data, forward, backward, "
                                         "optimizer, EMA update); snapshots and sampling "
                                         "off the clock")),
        chance=chance, points=dict(tfusion=tfusion, reference=peer),
        budgets=at_budgets(budgets, tfusion, peer), **comparison)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    plot(args.plot, tfusion, peer, chance, budgets, args.prompts, args.tfusion_config)
    for row in result["budgets"]:
        cells = [f"{row['minutes']:g} min"]
        for side in ("tfusion", "reference"):
            g = row[side]["generation"]
            cells.append(f"{side} step {row[side]['steps']}: "
                         + ("-" if g is None else f"{g['mean_attribute']:.3f}"))
        print(" | ".join(cells))
    print(f"time_ratio_vs_reference: {comparison['time_ratio_vs_reference']} "
          f"({comparison['how']}); target met: {comparison['target_met']}")
    print(f"wrote {args.out} and {args.plot}")
    if delete_workdir:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
