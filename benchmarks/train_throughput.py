"""Training tokens/s and MFU of tfusion's train step, against transfusion-pytorch.

    python benchmarks/train_throughput.py                 # cpu-s, both scenarios, reference
    python benchmarks/train_throughput.py --shape tiny --steps 2 --no-reference  # smoke

Scenarios (benchmarks/workloads.py):
  fixed  every sample 56 text tokens + one 8x8-patch image (120 tokens), 16 rows of 120;
  mix    captions 8-120 tokens, 1-2 images per sample, packed into rows by the
         framework's packer (data_pipelines.packing); useful tokens = non-pad tokens only.
The step is the trainer's own (tfusion.train.loop.Trainer.step_fn: AdamW, clipping,
non-finite skipping, donation), built from the experiment config with unrolled
layers and no remat. MFU = useful FLOPs (tfusion.flops.train_step_flops) per second
over this machine's float32 matmul peak, measured in the same run. Each timed step
is blocked on; the median step time is reported. The reference runs in its own venv
as a subprocess (benchmarks/reference_transfusion_pytorch.py) on the same samples.
Writes benchmarks/results/train_throughput.json; with --append-run it also keeps a
summary of this run next to those of the previous runs in that file (`three_runs`, the
last three):

    for i in 1 2 3; do python benchmarks/train_throughput.py --append-run; done
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:0] = [_ROOT, _HERE]

import workloads  # noqa: E402

# glibc otherwise returns the step's ~0.9 GB of freed temporaries to the OS and
# page-faults them back in every step (measured ~10% of step time on cpu-s).
GLIBC_TUNABLES = "glibc.malloc.trim_threshold=17179869184:glibc.malloc.mmap_max=0"
# Fake host devices split the 2 cores between 8 XLA devices (~7% slower); tests set it.
FAKE_DEVICES_FLAG = "--xla_force_host_platform_device_count"
# The interpreter that runs the reference: this one by default (`pip install -e
# .[reference]` adds torch + transfusion-pytorch), or another venv's python through
# TFUSION_REFERENCE_PYTHON / --reference-python.
REFERENCE_PYTHON = os.environ.get("TFUSION_REFERENCE_PYTHON", sys.executable)
DEFAULT_OUT = os.path.join(_HERE, "results", "train_throughput.json")


def benchmark_env(env: dict) -> dict:
    env = dict(env, GLIBC_TUNABLES=GLIBC_TUNABLES, JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(FAKE_DEVICES_FLAG)]
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def reexec_with_benchmark_env() -> None:
    """glibc reads its tunables at process start, so the process restarts once with them."""
    env = benchmark_env(os.environ)
    if any(os.environ.get(k) != env[k] for k in ("GLIBC_TUNABLES", "XLA_FLAGS", "JAX_PLATFORMS")):
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def experiment_config(shape: workloads.Shape, rows: int, seq_len: int, max_images: int):
    from experiments.base import base_config

    c = base_config()
    c.name = "train_throughput"
    h, w, ch = shape.latent
    c.model.update(vocab_size=shape.vocab, width=shape.width, depth=shape.depth,
                   num_heads=shape.heads, mlp_hidden=shape.mlp_hidden, latent_height=h,
                   latent_width=w, latent_channels=ch, patch_size=shape.patch,
                   dtype="float32", scan_layers=False, remat_policy="none")
    c.data.seq_len = seq_len
    c.data.max_images_per_row = max_images
    c.train.update(batch_size=rows, steps=1_000_000, grad_accum_steps=1)
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    return c


def sample_document(sample, shape: workloads.Shape, rng):
    """A benchmark sample as a tfusion document (BOS=1 EOS=2 BOI=3 EOI=4)."""
    import numpy as np

    from tfusion.batch import ImageSegment

    caption, images = sample
    text = rng.integers(5, shape.vocab, size=caption, dtype=np.int32)
    segments = [np.concatenate([[1], text, [3]]).astype(np.int32)]
    for i in range(images):
        latent = rng.standard_normal(shape.latent, dtype=np.float32)
        segments.append(ImageSegment(latent, t_max=999))
        segments.append(np.array([4, 3] if i + 1 < images else [4, 2], np.int32))
    return segments


def fixed_batches(shape: workloads.Shape, spec, count: int, seed: int, pad_id: int):
    """`count` batches of shape.batch rows, one 120-token sample per row (no padding)."""
    import numpy as np

    from tfusion.batch import assemble_rows

    rng = np.random.default_rng(seed)
    samples = workloads.fixed_samples(shape, shape.batch)
    return [assemble_rows([[sample_document(s, shape, rng)] for s in samples], spec, pad_id)
            for _ in range(count)]


def mix_batches(shape: workloads.Shape, spec, count: int, seed: int, pad_id: int,
                skip: int = 8):
    """`count` batches of the mix packed by the framework's own packer
    (data_pipelines.packing: first fit over shape.mix_open_rows open rows, fullest row
    closed first), fed the samples in order. The first `skip` batches are dropped:
    a fresh packer's first rows are denser than its steady state."""
    import grain
    import numpy as np

    from data_pipelines.packing import STATS_KEY, PackingIterDataset
    from data_pipelines.records import DocItem

    # Enough samples for the batches even at the densest packing.
    total = skip + count
    samples = workloads.mix_samples(shape, spec.batch_size * spec.max_images * (total + 2), seed)
    docs = grain.MapDataset.source(samples).map_with_index(
        lambda i, s: DocItem(document=sample_document(s, shape, np.random.default_rng([seed, i]))))
    it = iter(PackingIterDataset(docs, spec, pad_id, open_rows=shape.mix_open_rows))
    batches = [next(it) for _ in range(total)][skip:]
    for batch in batches:
        if batch.pop(STATS_KEY).get("skipped", 0):
            raise RuntimeError("a mix sample did not fit a row")
    return batches


def scenario_spec(name: str, shape: workloads.Shape):
    """BatchSpec of the scenario's steps."""
    from tfusion.batch import BatchSpec

    if name == "fixed":
        seq_len = workloads.useful_tokens(workloads.fixed_samples(shape, 1)[0], shape)
        return BatchSpec(shape.batch, seq_len, 1, shape.latent, shape.patch)
    max_images = shape.mix_seq_len // shape.patches  # as many as could ever fit
    return BatchSpec(shape.mix_rows, shape.mix_seq_len, max_images, shape.latent, shape.patch)


def time_steps(step_fn, state, batches, warmup: int, steps: int):
    """Warm-up (the first step compiles), then `steps` steps each blocked on and timed.

    Returns (state, last metrics, step times, batch index of each timed step, warm-up s).
    """
    from timing import timed_calls

    holder = {"state": state}

    def call(i):
        holder["state"], metrics = step_fn(holder["state"], batches[i % len(batches)])
        return metrics

    times, warmup_s, metrics = timed_calls(call, warmup, steps)
    picked = [(warmup + i) % len(batches) for i in range(steps)]
    return holder["state"], metrics, times, picked, warmup_s


def run_scenario(name: str, shape: workloads.Shape, warmup: int, steps: int, seed: int,
                 peak: float, profile_dir: str | None = None) -> dict:
    """Builds the trainer's step for this scenario's batch shape and times it."""
    import jax

    from tfusion import flops
    from tfusion.train import state as state_lib
    from tfusion.train.loop import Trainer

    distinct = min(warmup + steps, 4)  # batches cycled; shapes are static, so no recompiles
    spec = scenario_spec(name, shape)
    rows, seq_len, max_images = spec.batch_size, spec.seq_len, spec.max_images
    config = experiment_config(shape, rows, seq_len, max_images)
    config.train.peak_flops_per_device = peak
    make_batches = fixed_batches if name == "fixed" else mix_batches
    host = make_batches(shape, spec, distinct, seed, config.model.pad_id)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(config, workdir)
        _, state = state_lib.init_state(config.model, trainer.tx, trainer.mesh, trainer.table,
                                        config.train.seed, trainer.state_sh)
        batches = [jax.device_put(b) for b in host]
        useful = [flops.batch_stats(b, shape.patches) for b in host]
        step_flops = [flops.train_step_flops(config.model, b) for b in host]
        executed = flops.executed_stats(host[0])
        executed_flops = 3.0 * flops.forward_flops(config.model, executed)
        state, metrics, times, picked, warmup_s = time_steps(trainer.step_fn, state, batches,
                                                             warmup, steps)
        loss = float(metrics["loss"])
        if profile_dir:
            # Two more steps under the profiler (untimed): open with TensorBoard/Perfetto.
            with jax.profiler.trace(os.path.join(profile_dir, name)):
                for i in range(2):
                    state, metrics = trainer.step_fn(state, batches[i % distinct])
                jax.block_until_ready(metrics)
        trainer.checkpointer.close()
    median = statistics.median(times)
    tokens = statistics.mean(useful[k].tokens for k in picked)
    useful_flops = statistics.mean(step_flops[k] for k in picked)
    return dict(
        tokens_per_s=tokens / median, mfu=useful_flops / median / peak,
        mfu_executed=executed_flops / median / peak, step_s_median=median, step_s=times,
        warmup_s=warmup_s, useful_tokens_per_step=tokens, rows=rows, seq_len=seq_len,
        max_images=max_images, packing_efficiency=tokens / (rows * seq_len),
        useful_flops_per_step=useful_flops, executed_flops_per_step=executed_flops,
        useful_flops_per_token=useful_flops / tokens,
        final_loss=loss, peak_flops=peak)


def reference_available(python: str) -> bool:
    """Whether `python` can import the reference (torch and transfusion-pytorch)."""
    probe = subprocess.run([python, "-c", "import torch, transfusion_pytorch"],
                           capture_output=True)
    return probe.returncode == 0


def run_reference(shape_name: str, scenarios: list[str], warmup: int, steps: int, seed: int,
                  python: str) -> dict:
    """The reference in its own venv and process; its last stdout line is JSON."""
    cmd = [python, os.path.join(_HERE, "reference_transfusion_pytorch.py"), "--shape",
           shape_name, "--scenarios", ",".join(scenarios), "--warmup", str(warmup),
           "--steps", str(steps), "--seed", str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env=benchmark_env(os.environ), cwd=_ROOT)
    if proc.returncode and "No module named" in proc.stderr:
        raise RuntimeError(f"the reference needs torch and transfusion-pytorch in {python}: "
                           "pip install -e '.[reference]' there, pass --reference-python, "
                           f"or --no-reference\n{proc.stderr[-1000:]}")
    if proc.returncode:
        raise RuntimeError(f"reference failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_info() -> dict:
    import flax
    import jax
    import optax

    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu_model=model, cores=os.cpu_count(), jax_version=jax.__version__,
                jaxlib_devices=[d.device_kind for d in jax.devices()],
                flax_version=flax.__version__, optax_version=optax.__version__,
                python=platform.python_version(), glibc_tunables=os.environ.get("GLIBC_TUNABLES"))


def run_summary(result: dict) -> dict:
    """The figures of one run that three_runs keeps."""
    out = {}
    for name in ("fixed", "mix"):
        for key in ("tokens_per_s", "mfu", "mfu_executed", "reference_tokens_per_s",
                    "reference_mfu", "ratio_vs_reference", "fraction_of_bare_jax"):
            if key in result.get(name, {}):
                out[f"{name}_{key}"] = result[name][key]
    if "bare_jax" in result:
        out["bare_jax_mfu_executed"] = result["bare_jax"]["mfu_executed"]
    return dict(out, peak_flops=result["peak_flops"],
                reference_torch_matmul_peak_flops=result.get("reference_torch_matmul_peak_flops"),
                time=result["time"],
                load_average=result["load_average"])


def keep_runs(path: str, result: dict, keep: int = 3) -> dict:
    """The previous file's three_runs (when it was made on this CPU model) plus this run,
    the last `keep` of them; the top-level figures are the newest run's."""
    runs = []
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f).get("three_runs", {})
        if previous.get("cpu_model") == result["machine"]["cpu_model"]:
            runs = previous.get("runs", [])
    runs = (runs + [run_summary(result)])[-keep:]
    for i, run in enumerate(runs, 1):
        run["run"] = i
    return dict(note=f"the last {len(runs)} runs of `python benchmarks/train_throughput.py "
                     "--append-run` on this CPU model; the top-level figures are the last run",
                cpu_model=result["machine"]["cpu_model"], runs=runs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="cpu-s", choices=sorted(workloads.SHAPES))
    parser.add_argument("--scenarios", default="fixed,mix")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (1st compiles)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per scenario")
    # Its FLOP-counting step runs after the warm-up too, so 1 + 1 untimed steps.
    parser.add_argument("--reference-warmup", type=int, default=1)
    parser.add_argument("--reference-steps", type=int, default=5)
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--no-bare", action="store_true",
                        help="skip the bare JAX step (benchmarks/bare_jax_step.py)")
    parser.add_argument("--reference-python", default=REFERENCE_PYTHON)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-n", type=int, default=None,
                        help="matmul size of the peak measurement (default 2048)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--append-run", action="store_true",
                        help="keep this run's summary with the previous runs' (last three) "
                             "in the output's three_runs")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="also write a jax.profiler trace of 2 steps per scenario")
    args = parser.parse_args()
    reexec_with_benchmark_env()

    from matmul_peak import PEAK_MATMUL_SIZE, measure_peak_flops

    peak_n = args.peak_n or PEAK_MATMUL_SIZE

    shape = workloads.SHAPES[args.shape]
    scenarios = args.scenarios.split(",")
    load = {"start": os.getloadavg()}
    peaks = [measure_peak_flops(peak_n)]
    result = dict(benchmark="train_throughput", shape=args.shape,
                  command=shlex.join(["python", *sys.argv]), machine=machine_info())
    for name in scenarios:
        result[name] = run_scenario(name, shape, args.warmup, args.steps, args.seed, peaks[0],
                                    args.profile)
        print(f"[tfusion] {name}: {result[name]['tokens_per_s']:.0f} tokens/s, "
              f"MFU {result[name]['mfu']:.3f}", flush=True)
        # The matmul rate of this shared VM swings by up to ~30% over minutes (measured
        # 335-474 GFLOP/s); sampling it between the timed blocks keeps the best one seen.
        peaks.append(measure_peak_flops(peak_n))
    if not args.no_bare and "fixed" in scenarios:
        # The ceiling: a bare JAX step of the fixed shape, same process, same peak.
        import bare_jax_step

        spec = scenario_spec("fixed", shape)
        bare = bare_jax_step.run(shape, spec.batch_size, spec.seq_len, args.warmup, args.steps,
                                 peaks[0], args.seed)
        result["bare_jax"] = bare
        peaks.append(measure_peak_flops(peak_n))
        result["fixed"]["fraction_of_bare_jax"] = (result["fixed"]["mfu_executed"]
                                                   / bare["mfu_executed"])
        print(f"[bare jax] fixed shape: MFU (executed) {bare['mfu_executed']:.3f}; tfusion "
              f"reaches {result['fixed']['fraction_of_bare_jax']:.2f} of it", flush=True)
    load["after_tfusion"] = os.getloadavg()
    if not args.no_reference:
        ref = run_reference(args.shape, scenarios, args.reference_warmup, args.reference_steps,
                            args.seed, args.reference_python)
        result["machine"].update(torch_version=ref["torch_version"],
                                 torch_threads=ref["torch_threads"])
        result["reference_params"] = ref["params"]
        result["reference_torch_matmul_peak_flops"] = ref.get("torch_matmul_peak_flops")
        for name in scenarios:
            r = ref[name]
            result[name].update(reference_tokens_per_s=r["tokens_per_s"],
                                reference_step_s_median=r["step_s_median"],
                                reference_step_s=r["step_s"],
                                reference_processing_strategy=r["processing_strategy"],
                                reference_flops_per_useful_token=r["flops_per_useful_token"],
                                reference_useful_flops_per_s=(r["flops_per_useful_token"]
                                                              * r["tokens_per_s"]),
                                ratio_vs_reference=result[name]["tokens_per_s"] / r["tokens_per_s"])
            print(f"[reference] {name}: {r['tokens_per_s']:.0f} tokens/s, "
                  f"ratio {result[name]['ratio_vs_reference']:.2f}x", flush=True)
        load["after_reference"] = os.getloadavg()
    # The peak is the best matmul rate seen in the run (start, between the timed
    # blocks, end); every MFU is rescaled to it, so MFU errs low, never high.
    peaks.append(measure_peak_flops(peak_n))
    peak = max(peaks)
    for name in scenarios:
        for key in ("mfu", "mfu_executed"):
            result[name][key] *= peaks[0] / peak
        result[name]["peak_flops"] = peak
        if "reference_useful_flops_per_s" in result[name]:  # its own FLOP count, same peak
            result[name]["reference_mfu"] = result[name]["reference_useful_flops_per_s"] / peak
    if "bare_jax" in result:
        result["bare_jax"]["mfu_executed"] *= peaks[0] / peak
        result["bare_jax"]["peak_flops"] = peak
    result.update(peak_flops=peak, peak_flops_samples=peaks, peak_matmul_size=peak_n, load_average=load,
                  time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if args.append_run:
        result["three_runs"] = keep_runs(args.out, result)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out} (peak {peak / 1e9:.1f} GFLOP/s, load {load})")


if __name__ == "__main__":
    main()
