"""Model, diffusion and loss configs: typed, frozen, validated dataclasses.

Each field is documented once, here, with its default (where the paper is silent, what
we chose and why). Experiments start from `model_config()` / `diffusion_config()` /
`loss_config()`, ml_collections copies that the command line overrides; at the edge
`ModelConfig.of(config.model)` (likewise Diffusion-, LossConfig) turns a section back into
its dataclass, raising ConfigError naming the first unknown, missing or bad field.
"""
from __future__ import annotations

import dataclasses
import math

import ml_collections

MODALITY_LAYERS = ("linear", "unet")
MODALITY_WEIGHTS = ("shared", "untied")
UNTIED_INITS = ("fresh", "copy")
ROPE_SCALINGS = ("none", "linear", "llama3")
IMAGE_ATTENTION = ("bidirectional", "causal")
IMAGE_REPRESENTATIONS = ("continuous", "discrete")
DTYPES = ("float32", "bfloat16", "float16")
# Names only: tfusion/model/transformer.py maps them to jax checkpoint policies and
# tfusion/kernels/__init__.py to kernels (each checks it covers exactly these).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attention_out")
ATTENTION_KERNELS = ("xla", "flash_tpu", "flash_gpu", "auto", "flash", "cudnn")
# Names only: tfusion/diffusion.py implements the processes, predictions, weightings and
# schedules, tfusion/inference/diffusion_samplers.py the samplers of each process.
PROCESSES = ("ddpm", "flow")
PREDICTIONS = ("eps", "v", "x0")
LOSS_WEIGHTINGS = ("none", "min_snr")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
SCHEDULES = ("cosine", "linear")
SAMPLERS_BY_PROCESS = {"ddpm": ("ddpm", "ddim", "dpmpp_2m"), "flow": ("euler", "heun", "dpmpp_2m")}
# Where a K-step sampler puts its levels (diffusion_samplers.schedule_for).
SPACINGS_BY_PROCESS = {"ddpm": ("linspace", "trailing", "logsnr"), "flow": ("linspace",)}
# The token embedding and LM head have vocab_size rounded up to a multiple of this
# many rows (model.padded_vocab_size = 0): Llama 2's 32002 ids = 2 x 16001 shard over
# no tensor axis; 32128 = 251 x 128 shards over up to 128 ways (and fills MXU tiles).
VOCAB_PAD_MULTIPLE = 128


class ConfigError(ValueError):
    """A config value is invalid; the message starts with the field's full name."""

    def __init__(self, field: str, message: str):
        super().__init__(f"config.{field}: {message}")
        self.field = field


def llama_mlp_hidden(width: int, multiple_of: int = 256) -> int:
    """SwiGLU hidden size by Llama's rule: 8/3 * width rounded up to `multiple_of`."""
    hidden = int(8 * width / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


class _Section:
    """Conversion shared by the three sections: from a ConfigDict or mapping (unknown
    and missing fields refused), to a plain dict, and to an ml_collections copy."""

    SECTION = ""  # the field's prefix in error messages

    @classmethod
    def of(cls, section, prefix: str | None = None):
        """From a ConfigDict (or a mapping), validated; an instance is returned as is."""
        if isinstance(section, cls):
            return section
        prefix = prefix or cls.SECTION
        values = dict(section.to_dict() if hasattr(section, "to_dict") else section)
        names = {f.name for f in dataclasses.fields(cls)}
        for field in sorted(set(values) - names):
            raise ConfigError(f"{prefix}.{field}", f"unknown field; known: {sorted(names)}")
        for field in sorted(names - set(values)):
            raise ConfigError(f"{prefix}.{field}", f"missing (see tfusion/config.py {cls.__name__})")
        config = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        config.validate(prefix)
        return config

    def to_dict(self) -> dict:
        """The fields as a plain dict (what config.json and checkpoints record)."""
        return dataclasses.asdict(self)

    def fail(self, prefix: str, field: str, message: str):
        raise ConfigError(f"{prefix}.{field}", message)

    def check_choices(self, prefix: str, choices: dict) -> None:
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                self.fail(prefix, field, f"unknown {getattr(self, field)!r}; choose from {allowed}")


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Section):
    """config.model. Frozen and hashable: jitted functions take it as a static argument."""
    SECTION = "model"
    # --- backbone (Llama-style: RMSNorm pre-norm, SwiGLU, RoPE) ---
    vocab_size: int = 32_000 + 2  # Llama 2's 32K sentencepiece + BOI/EOI appended
    # Rows of the token embedding and LM head: ids vocab_size .. padded_vocab_size - 1
    # exist only so the vocab axis shards evenly (tfusion/sharding.py); the model's
    # logits there are a large negative constant, so they are never sampled and never
    # enter a loss. 0 = vocab_size rounded up to VOCAB_PAD_MULTIPLE (128), resolved when
    # the config is read, and written into the run's config by validate_config, so
    # config.json records the number. Runs saved before padding existed have
    # padded_vocab_size = vocab_size (no padding); tfusion/train/workdir.py says so.
    padded_vocab_size: int = 0
    pad_id: int = 0  # id placed at patch positions and padding; never a loss target
    width: int = 768  # d_model
    depth: int = 16  # transformer blocks
    num_heads: int = 12
    num_kv_heads: int = 0  # grouped-query attention: 0 = same as num_heads (plain MHA)
    mlp_hidden: int = 0  # SwiGLU hidden size; 0 = Llama's 8/3 * width rounded to 256
    rope_theta: float = 10_000.0
    # RoPE frequency scaling of long-context checkpoints (layers.rope_inv_freq): "none",
    # "linear" (every frequency / factor) or "llama3" (Llama 3.1: low frequencies / factor,
    # high ones kept, a smooth ramp between, set by the two factors and the original
    # context length).
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    qkv_bias: bool = False  # biases on q, k and v (Qwen2); Llama has none
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # Llama 2 unties the LM head from the embedding
    qk_norm: bool = False  # RMSNorm on q and k per head: only for the Chameleon baseline
    init_std: float = 0.02  # std of normal init of embeddings and projections
    # --- modality-untied backbone (Mixture-of-Transformers / LMFusion) ---
    # "shared" (the paper): one set of block weights for every position. "untied": every
    # block has an image twin of each weight (q/k/v/o, SwiGLU, the norms; image_* names),
    # and the final norm too; image positions use the twins, text positions the shared
    # names (so an imported or text-only checkpoint loads into the text side), one global
    # self-attention over both. tfusion/model/transformer.py routes each position to its
    # modality's weights in tiles, so a step costs the shared step's FLOPs plus at most
    # one tile per row group (not twice).
    modality_weights: str = "shared"
    # "copy": the image twins start as copies of the text weights (after a warm start:
    # of the loaded ones), so step 0 computes exactly what the shared model does.
    # "fresh": drawn like any new layer.
    untied_init: str = "copy"
    untied_tile: int = 128  # positions per routing tile (the most one row group wastes)
    # Unroll the loop over tiles (False: lax.scan, a smaller program when rows are long).
    # XLA's cost analysis counts a loop body once, so FLOP counts need it unrolled; on
    # CPU the unrolled loop is also faster (shapes_tiny step 1.54x shared, scan 2.04x:
    # benchmarks/untied_weights.py).
    untied_unroll: bool = True
    # --- numerics and memory ---
    # Compute dtype of activations and matmuls. Params (and Adam state) stay float32:
    # mixed precision casts them at use.
    dtype: str = "float32"
    scan_layers: bool = True  # lax.scan over stacked layers (fast compile); False unrolls
    remat_policy: str = "none"  # one of REMAT_POLICIES (tfusion/model/transformer.py)
    # --- attention ---
    attention_kernel: str = "xla"  # one of ATTENTION_KERNELS (tfusion/kernels/__init__.py)
    # Paper: full attention among the patches of one image. "causal" is the ablation.
    image_attention: str = "bidirectional"
    # --- image modality layers ---
    latent_height: int = 32  # latent grid (paper: 256 px VAE f8 -> 32 x 32 x 8)
    latent_width: int = 32
    latent_channels: int = 8
    patch_size: int = 2  # k x k latent patches (paper default 2 -> 256 patches)
    modality_layer: str = "linear"  # "linear" or "unet"
    # U-Net (paper: down blocks in, up blocks out, LayerNorm instead of AdaLN; ~0.27B
    # params at paper scale). The paper gives no channel widths; these give 0.262B
    # (encoder + decoder) at patch 2, width 4096 (0.253B at width 768), all multiples
    # of 128 so they shard over fsdp (experiments/paper.py). One entry per level:
    # log2(k) + 1.
    unet_channels: tuple = (512, 1408)  # channels per level, fine to coarse
    unet_blocks_per_level: int = 2  # residual blocks per level
    timestep_embed_dim: int = 256  # sinusoidal features before the timestep MLP (U-Net)
    # --- how images enter the transformer (docs/experiments.md, "Chameleon baseline") ---
    # "continuous": Transfusion, VAE latent patches + diffusion loss. "discrete": the
    # Chameleon-style baseline, VQ code ids as ordinary tokens after the text vocabulary
    # (ids vocab_size - codebook_size .. vocab_size - 1), LM loss on every token, no
    # image slots in the batch (M = 0). The trainer needs no switch (an M = 0 batch has
    # no diffusion term); the data pipeline reads it.
    image_representation: str = "continuous"
    codebook_size: int = 0  # discrete: VQ codebook entries appended to the vocabulary
    image_tokens: int = 0  # discrete: VQ tokens per image (paper: 1024)

    def __post_init__(self):
        if self.padded_vocab_size == 0 and isinstance(self.vocab_size, int):
            object.__setattr__(self, "padded_vocab_size", padded_vocab(self.vocab_size))

    # --- derived sizes ---

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def mlp_dim(self) -> int:
        return self.mlp_hidden or llama_mlp_hidden(self.width)

    @property
    def grid_h(self) -> int:
        return self.latent_height // self.patch_size

    @property
    def grid_w(self) -> int:
        return self.latent_width // self.patch_size

    @property
    def patches_per_image(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.latent_channels

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.latent_height, self.latent_width, self.latent_channels

    def validate(self, prefix: str = "model") -> None:
        """Raises ConfigError naming the first bad field."""
        for field in ("vocab_size", "width", "depth", "num_heads", "latent_height",
                      "latent_width", "latent_channels", "patch_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                self.fail(prefix, field, f"must be a positive int, got {value!r}")
        if self.width % self.num_heads:
            self.fail(prefix, "width", f"{self.width} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2:
            self.fail(prefix, "num_heads", f"head dim {self.head_dim} must be even for RoPE")
        if self.num_kv_heads < 0 or self.num_heads % self.kv_heads:
            self.fail(prefix, "num_kv_heads",
                      f"{self.num_kv_heads} must divide num_heads={self.num_heads}")
        if self.mlp_hidden < 0:
            self.fail(prefix, "mlp_hidden", f"must be >= 0, got {self.mlp_hidden}")
        if (not isinstance(self.padded_vocab_size, int)
                or self.padded_vocab_size < self.vocab_size):
            self.fail(prefix, "padded_vocab_size", f"{self.padded_vocab_size!r} must be an int "
                                                   f">= vocab_size={self.vocab_size} (0 = "
                                                   f"rounded up to {VOCAB_PAD_MULTIPLE})")
        if not 0 <= self.pad_id < self.vocab_size:
            self.fail(prefix, "pad_id", f"{self.pad_id} is outside the vocabulary [0, {self.vocab_size})")
        for field in ("latent_height", "latent_width"):
            if getattr(self, field) % self.patch_size:
                self.fail(prefix, "patch_size", f"{self.patch_size} does not divide "
                                                f"{field}={getattr(self, field)}")
        if self.rope_scaling != "none" and not self.rope_scaling_factor >= 1.0:
            self.fail(prefix, "rope_scaling_factor", f"must be >= 1, got {self.rope_scaling_factor}")
        if self.rope_scaling == "llama3" and not (
                0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
            self.fail(prefix, "rope_high_freq_factor", "llama3 scaling needs 0 < "
                                                       "rope_low_freq_factor < rope_high_freq_factor")
        self.check_choices(prefix, dict(
            rope_scaling=ROPE_SCALINGS,
            modality_layer=MODALITY_LAYERS, remat_policy=REMAT_POLICIES,
            modality_weights=MODALITY_WEIGHTS, untied_init=UNTIED_INITS,
            image_attention=IMAGE_ATTENTION, dtype=DTYPES, attention_kernel=ATTENTION_KERNELS,
            image_representation=IMAGE_REPRESENTATIONS))
        if not isinstance(self.untied_tile, int) or self.untied_tile <= 0:
            self.fail(prefix, "untied_tile", f"must be a positive int, got {self.untied_tile!r}")
        if self.modality_weights == "untied" and self.image_representation == "discrete":
            self.fail(prefix, "modality_weights", "untied weights route image latent "
                      "positions; a discrete (VQ token) model has none")
        if self.modality_layer == "unet":
            if self.patch_size & (self.patch_size - 1):
                self.fail(prefix, "patch_size", f"U-Net downsamples by 2 per level; "
                                                f"{self.patch_size} is not a power of 2")
            levels = int(math.log2(self.patch_size)) + 1
            if len(self.unet_channels) != levels:
                self.fail(prefix, "unet_channels", f"needs log2(patch_size)+1 = {levels} "
                                                   f"levels, got {len(self.unet_channels)}")
            if any(ch % 32 for ch in self.unet_channels):
                self.fail(prefix, "unet_channels", "each level's channels must be a multiple of 32")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig(_Section):
    """config.diffusion: the noising process, its loss and the default sampler."""
    SECTION = "diffusion"
    # Noising process (tfusion/diffusion.py). Paper: "ddpm". "flow" = rectified flow
    # (x_t = (1 - t) x0 + t eps, t in [0, 1]; SD3, the PyTorch peer).
    process: str = "ddpm"
    # What the model's image output means: "eps" (paper), "v" (ddpm: a eps - s x0,
    # Salimans & Ho; flow: the velocity eps - x0) or "x0". Loss, samplers, CFG and the
    # x0 clip convert exactly. At 3M parameters "eps" loses the high-noise steps that
    # lay out an image (docs/diffusion.md); the tiny experiments choose by measurement.
    prediction: str = "eps"
    # Per-image loss weighting: "none" (paper: plain MSE) or "min_snr" (Hang et al.
    # 2023: the x0-space loss weighted by min(SNR, gamma), written in the prediction's space).
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0
    # Training times: "uniform" (paper) or "logit_normal" (SD3: u = sigmoid(mean + std n),
    # mapped to the time axis exactly like a uniform u).
    timestep_sampling: str = "uniform"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    # Log-SNR shift of the schedule (Hoogeboom et al. 2023): log SNR - 2 log(shift), for
    # training and sampling alike. 1 = the plain schedule; > 1 more noise (large images),
    # < 1 less (small images). For flow this is SD3's time shift.
    schedule_shift: float = 1.0
    num_train_steps: int = 1000  # T (ddpm steps; flow: the scale of the model's time input)
    schedule: str = "cosine"  # Nichol & Dhariwal cosine schedule (paper); ddpm only
    cosine_s: float = 0.008  # cosine schedule offset (Nichol & Dhariwal's value)
    max_beta: float = 0.999  # beta clip of the cosine schedule (Nichol & Dhariwal)
    loss_weight: float = 5.0  # lambda in L = L_LM + lambda * L_DDPM (paper: 5)
    # Image-first caption pairs are noised at t <= this (paper's noise limiting); flow:
    # at t <= noise_limit_t / (T - 1) before the shift.
    noise_limit_t: int = 500
    # Paper does not give the CFG caption-dropout rate; 0.1 is the common choice.
    cfg_dropout: float = 0.1
    sample_steps: int = 250  # sampler steps at inference (paper: 250 respaced DDPM steps)
    # ddpm process: "ddpm" (ancestral, paper), "ddim" (eta 0) or "dpmpp_2m" (DPM-Solver++
    # 2M, Lu et al. 2022); flow: "euler", "heun" or "dpmpp_2m" (the same solver on the
    # flow's a = 1 - t, s = t).
    sampler: str = "ddpm"
    # Levels of a K-step ddpm sampler: "linspace" (K of the T steps evenly, both ends:
    # paper), "trailing" (every T/K-th step counted back from T - 1, Lin et al. 2024) or
    # "logsnr" (uniform in log SNR between the ends, continuous times). flow: "linspace"
    # (its levels are shifted by schedule_shift).
    sample_spacing: str = "linspace"
    cfg_scale: float = 3.0  # paper: 3-5
    # Guidance interval (Kynkaanniemi et al. 2024) in noise level s (x_t = a x0 + s eps,
    # s in [0, 1]: sqrt(1 - alpha_bar) for ddpm, t for flow): CFG at levels with
    # lo <= s <= hi, the conditional output alone elsewhere (its unconditional twin is
    # not computed there). (0, 1) = CFG at every step (paper).
    cfg_interval: tuple = (0.0, 1.0)

    def validate(self, prefix: str = "diffusion") -> None:
        """Raises ConfigError naming the first bad field."""
        if self.num_train_steps <= 1:
            self.fail(prefix, "num_train_steps", f"must be > 1, got {self.num_train_steps}")
        self.check_choices(prefix, dict(
            process=PROCESSES, prediction=PREDICTIONS, loss_weighting=LOSS_WEIGHTINGS,
            timestep_sampling=TIMESTEP_SAMPLINGS, schedule=SCHEDULES,
            sampler=SAMPLERS_BY_PROCESS[self.process] if self.process in PROCESSES else (),
            sample_spacing=SPACINGS_BY_PROCESS[self.process] if self.process in PROCESSES
            else ()))
        lo_hi = tuple(self.cfg_interval)
        if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] <= lo_hi[1] <= 1.0:
            self.fail(prefix, "cfg_interval", f"must be (lo, hi) with 0 <= lo <= hi <= 1 "
                                              f"(noise levels s), got {self.cfg_interval}")
        if not 0 <= self.noise_limit_t < self.num_train_steps:
            self.fail(prefix, "noise_limit_t", f"{self.noise_limit_t} outside [0, {self.num_train_steps})")
        if not 0.0 <= self.cfg_dropout < 1.0:
            self.fail(prefix, "cfg_dropout", f"{self.cfg_dropout} outside [0, 1)")
        if not 0 < self.sample_steps <= self.num_train_steps:
            self.fail(prefix, "sample_steps", f"{self.sample_steps} outside (0, {self.num_train_steps}]")
        for field in ("min_snr_gamma", "logit_normal_std", "schedule_shift"):
            if not getattr(self, field) > 0:
                self.fail(prefix, field, f"must be > 0, got {getattr(self, field)}")
        if self.loss_weight < 0:
            self.fail(prefix, "loss_weight", f"must be >= 0, got {self.loss_weight}")
        if self.process == "flow" and self.prediction == "eps":
            # x_t = (1 - t) x0 + t eps: recovering x0 = (x_t - t eps) / (1 - t) divides by
            # the signal coefficient 1 - t, which is 0 where sampling starts (t = 1), so
            # the first step's x0 (and the velocity) is inf; near t = 1 the division
            # amplifies every error of eps. The velocity ("v") or "x0" has no pole.
            self.fail(prefix, "prediction", "'eps' is undefined for process='flow': its x0 "
                                            "= (x_t - t eps) / (1 - t) divides by 0 at t = 1, "
                                            "where sampling starts; use 'v' (the velocity "
                                            "eps - x0) or 'x0'")


@dataclasses.dataclass(frozen=True)
class LossConfig(_Section):
    """config.loss."""
    SECTION = "loss"
    z_loss_weight: float = 0.0  # Chameleon baseline uses z-loss (1e-5); Transfusion none

    def validate(self, prefix: str = "loss") -> None:
        if self.z_loss_weight < 0:
            self.fail(prefix, "z_loss_weight", f"must be >= 0, got {self.z_loss_weight}")


def padded_vocab(vocab_size: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """vocab_size rounded up to a multiple of `multiple`."""
    return multiple * -(-vocab_size // multiple)


def model_config() -> ml_collections.ConfigDict:  # what experiments override
    # padded_vocab_size stays 0 (derived from whatever vocab_size becomes) until
    # validate_config resolves it.
    return ml_collections.ConfigDict(dict(ModelConfig().to_dict(), padded_vocab_size=0))


def diffusion_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(DiffusionConfig().to_dict())


def loss_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(LossConfig().to_dict())


def is_discrete(model_cfg) -> bool:
    """The Chameleon-style baseline: images are VQ code tokens, not latents."""
    return getattr(model_cfg, "image_representation", "continuous") == "discrete"


def image_token_offset(model_cfg):
    """Id of VQ code 0 for the discrete (Chameleon) baseline, whose codes follow the
    text vocabulary (BOI/EOI included); None for Transfusion's continuous images."""
    if not is_discrete(model_cfg):
        return None
    return int(model_cfg.vocab_size - model_cfg.codebook_size)

