"""Named sweeps: each expands into runs (experiment + config overrides + run name).

`python -m launch.sweep --sweep=NAME --workdir=DIR` trains them one after another
(DIR/<run name> each) or prints the cluster commands; see docs/experiments.md.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from experiments import ablations, micro, paper
from tfusion.autoencoders.train_config import WEIGHTS_DIR


class Run(NamedTuple):
    name: str  # the run's workdir under the sweep's workdir
    experiment: str  # registry name
    overrides: dict  # dotted config field -> value (--config.FIELD=VALUE)
    family: str  # scaling-law family the run belongs to ("transfusion", "chameleon")
    # launch.<program> runs it: "train", or "train_autoencoder" for an image tokenizer
    # that later runs of the sweep read (only "train" runs become scaling points).
    program: str = "train"


# In override values, replaced by the sweep's workdir (a path to an earlier run's output).
SWEEP_DIR = "{sweep_dir}"


class Sweep(NamedTuple):
    build: Callable[[], list]
    description: str
    # What launch.sweep writes after the runs: "scaling" (fits, parity, plots) or
    # "diffusion" (the recipe ablation table: tfusion/eval/diffusion_report.py).
    report: str = "scaling"


PAPER_TOKEN_BUDGETS = (50e9, 100e9, 250e9, 500e9)  # 500B = the paper's 250K steps


def steps_for_tokens(tokens: float, tokens_per_step: int) -> int:
    return max(1, round(tokens / tokens_per_step))


def _family_experiments(size: str) -> dict[str, str]:
    return {"transfusion": f"transfusion_{size}", "chameleon": f"chameleon_{size}"}


def paper_scaling() -> list[Run]:
    """Both families at the five sizes, each on the paper's 0.5T tokens."""
    return [Run(f"{family}_{size}", exp, {}, family)
            for size in paper.PAPER_SIZES
            for family, exp in _family_experiments(size).items()]


def paper_token_budgets() -> list[Run]:
    """Sizes x families x token budgets; the cosine schedule ends at each budget."""
    step_tokens = paper.SEQ_LEN * paper.BATCH_ROWS
    runs = []
    for tokens in PAPER_TOKEN_BUDGETS:
        steps = steps_for_tokens(tokens, step_tokens)
        for size in paper.PAPER_SIZES:
            for family, exp in _family_experiments(size).items():
                runs.append(Run(f"{family}_{size}_{tokens / 1e9:g}Btok", exp,
                                {"train.steps": steps}, family))
    return runs


def patch_sizes() -> list[Run]:
    """Linear vs U-Net modality layers at patch 1/2/4/8 (0.76B, the ablation size)."""
    size = ablations.ABLATION_SIZE
    return [Run(f"{layer}_p{k}", f"transfusion_{size}_{layer}_p{k}", {}, f"{layer}_p{k}")
            for layer in paper.MODALITY_LAYERS for k in paper.PATCH_SIZES]


def ablation_grid() -> list[Run]:
    """The base 0.76B run and one run per ablation (attention, lambda, noise limit, CFG)."""
    size = ablations.ABLATION_SIZE
    return [Run("base", f"transfusion_{size}", {}, "base")] + [
        Run(suffix, f"transfusion_{size}_{suffix}", {}, suffix) for suffix in ablations.ABLATIONS]


MICRO_TOKENIZER_RUN = "vq_tokenizer"


def cpu_micro() -> list[Run]:
    """Four sizes x both families on shapes: the scaling pipeline end to end on a CPU.
    The Chameleon runs' VQ tokenizer is trained first, in the same sweep."""
    vq_weights = f"{SWEEP_DIR}/{MICRO_TOKENIZER_RUN}/{WEIGHTS_DIR}"
    tokenizer = Run(MICRO_TOKENIZER_RUN, "vq_shapes_micro", {}, "tokenizer", "train_autoencoder")
    return [tokenizer] + [
        Run(f"{family}_{size}", f"micro_{family}_{size}",
            {"data.encoder_path": vq_weights} if family == "chameleon" else {}, family)
        for family in micro.FAMILIES for size in micro.MICRO_SIZES]


def cpu_smoke() -> list[Run]:
    """Two tiny Transfusion runs of a few steps: checks train -> collect -> fit -> plot."""
    few = {"train.steps": 6, "train.log_every": 2, "train.eval_every": 6,
           "train.checkpoint_every": 6, "data.eval_batches": 1}
    return [Run(f"transfusion_{size}", f"micro_transfusion_{size}", few, "transfusion")
            for size in ("w64", "w96")]


# The diffusion-recipe ablation on shapes_tiny: each option of the tiny default flipped
# alone; two seeds of the default show the run-to-run noise. Every run trains half the
# default's steps (1200, ~6 min on 2 cores each) so that the 8 runs fit in an hour.
# Its base keeps the uniform t it was measured with (docs/diffusion.md); the
# logit_normal row is the option shapes_tiny has used since.
DIFFUSION_ABLATION_COMMON = {"train.steps": 1200, "train.eval_every": 600,
                             "train.checkpoint_every": 600, "train.sample_every": 0,
                             "diffusion.timestep_sampling": "uniform"}
DIFFUSION_ABLATIONS = {
    "default": ({}, "shapes_tiny with uniform t"),
    "default_seed1": ({"train.seed": 1}, "the same, seed 1"),
    "eps": ({"diffusion.prediction": "eps"}, "epsilon prediction (the paper's)"),
    "flow": ({"diffusion.process": "flow", "diffusion.prediction": "v",
              "diffusion.sampler": "euler"}, "rectified flow, velocity, Euler"),
    "no_ema": ({"train.ema_decay": 0.0}, "raw params, no EMA"),
    "min_snr": ({"diffusion.loss_weighting": "min_snr"}, "min-SNR-5 weighting"),
    "logit_normal": ({"diffusion.timestep_sampling": "logit_normal"}, "logit-normal(0, 1) t"),
    "unet": ({"model.modality_layer": "unet", "model.unet_channels": (32, 64, 128)},
             "U-Net modality layers (32/64/128 channels)"),
}


def diffusion_ablation() -> list[Run]:
    return [Run(name, "shapes_tiny", {**DIFFUSION_ABLATION_COMMON, **overrides}, name)
            for name, (overrides, _) in DIFFUSION_ABLATIONS.items()]


# The micro reproduction of the paper's findings (issue 14, docs/reproduction.md): the
# scaling comparison at four sizes, a second seed of both families at the ablation size,
# and the paper's ablations flipped one at a time on Transfusion at that size.
# patch_*: patch 1 makes an image 256 patches, which a 256-token row cannot hold, so the
# three patch runs use rows of 512 x 4 (the same 2048 tokens per step as 256 x 8).
_LONG_ROWS = {"data.seq_len": 512, "train.batch_size": 4}
REPRO_ABLATIONS = {
    "causal": ({"model.image_attention": "causal"},
               "causal attention inside an image (paper: bidirectional)"),
    "no_noise_limit": ({"diffusion.noise_limit_t": ablations.NOISE_OFF_T},
                       "image-first pairs noised up to t = T-1 (paper: t <= 500)"),
    "unet": ({"model.modality_layer": "unet", "model.unet_channels": (32, 64, 128)},
             "U-Net modality layers, 32/64/128 channels (paper: linear at this table)"),
    "patch1": ({**_LONG_ROWS, "model.patch_size": 1, "data.max_images_per_row": 2},
               "patch 1 (256 patches per image), rows of 512"),
    "patch2": ({**_LONG_ROWS, "model.patch_size": 2, "data.max_images_per_row": 8},
               "patch 2 (64 patches per image), rows of 512"),
    "patch4": ({**_LONG_ROWS, "model.patch_size": 4, "data.max_images_per_row": 16},
               "patch 4 (16 patches per image), rows of 512"),
}
REPRO_SEEDS = (1,)  # extra seeds of the ablation size, both families


def micro_reproduction() -> list[Run]:
    vq_weights = {"data.encoder_path": f"{SWEEP_DIR}/{MICRO_TOKENIZER_RUN}/{WEIGHTS_DIR}"}
    tokenizer = Run(MICRO_TOKENIZER_RUN, "vq_shapes_micro", {}, "tokenizer", "train_autoencoder")

    def family_overrides(family: str) -> dict:
        return vq_weights if family == "chameleon" else {}

    size = micro.REPRO_ABLATION_SIZE
    scaling = [Run(f"{family}_{s}", f"repro_{family}_{s}", family_overrides(family), family)
               for family in micro.FAMILIES for s in micro.MICRO_SIZES]
    ablation = [Run(f"ablation_{name}", f"repro_transfusion_{size}", overrides,
                    f"ablation_{name}") for name, (overrides, _) in REPRO_ABLATIONS.items()]
    seeds = [Run(f"{family}_{size}_seed{seed}", f"repro_{family}_{size}",
                 {**family_overrides(family), "train.seed": seed}, f"{family}_seed{seed}")
             for seed in REPRO_SEEDS for family in micro.FAMILIES]
    # The cheap, most-asked findings first so that a sweep cut short still answers them:
    # the family comparison, then attention and noise limiting, the seed spread, and last
    # the modality-layer and patch ablations (patch 1 is the most expensive run).
    first, last = ablation[:2], ablation[2:]
    return [tokenizer] + scaling + first + seeds + last


SWEEPS: dict[str, Sweep] = {
    "paper_scaling": Sweep(paper_scaling, "Transfusion vs Chameleon, 5 sizes, 0.5T tokens each"),
    "paper_token_budgets": Sweep(paper_token_budgets,
                                 "Transfusion vs Chameleon, 5 sizes x 50B/100B/250B/500B tokens"),
    "patch_sizes": Sweep(patch_sizes, "0.76B linear vs U-Net at patch 1/2/4/8"),
    "ablations": Sweep(ablation_grid,
                       "0.76B ablations: causal images, lambda, noise limiting, CFG dropout"),
    "cpu_micro": Sweep(cpu_micro, "CPU: 4 micro sizes x Transfusion/Chameleon on shapes, "
                                  "< 1 h on 2 idle cores"),
    "cpu_smoke": Sweep(cpu_smoke, "CPU: 2 micro Transfusion runs x 6 steps (pipeline check)"),
    "diffusion_ablation": Sweep(diffusion_ablation, "CPU: shapes_tiny with each diffusion "
                                "option flipped (docs/diffusion.md)", report="diffusion"),
    "micro_reproduction": Sweep(micro_reproduction, "CPU: the paper's findings at micro "
                                "scale, both families x 4 sizes + ablations + a second "
                                "seed (docs/reproduction.md)", report="reproduction"),
}


def expand(name: str) -> list[Run]:
    if name not in SWEEPS:
        raise KeyError(f"unknown sweep {name!r}; known: {sorted(SWEEPS)}")
    runs = SWEEPS[name].build()
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"sweep {name!r} has duplicate run names")
    return runs
