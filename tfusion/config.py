"""Model, diffusion and loss config: ml_collections defaults and the typed model config.

Experiments (experiments/) build on these ConfigDict defaults and override them from
the command line; every field is documented where it is set. Fields where the paper
is silent say what we chose and why. At the edge the model section becomes a frozen,
validated `ModelConfig` whose properties are the derived sizes (head_dim, kv_heads,
mlp_dim, patches_per_image, ...): the model, FLOP counts and inference read those.
"""
from __future__ import annotations

import dataclasses
import math

import ml_collections

from tfusion import diffusion

MODALITY_LAYERS = ("linear", "unet")
IMAGE_ATTENTION = ("bidirectional", "causal")
IMAGE_REPRESENTATIONS = ("continuous", "discrete")
SCHEDULES = ("cosine", "linear")
DTYPES = ("float32", "bfloat16", "float16")
# Names only: tfusion/model/transformer.py maps them to jax checkpoint policies and
# tfusion/kernels/__init__.py to kernels (each checks it covers exactly these).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attention_out")
ATTENTION_KERNELS = ("xla", "flash_tpu", "flash_gpu", "flash", "cudnn")


class ConfigError(ValueError):
    """A config value is invalid; the message starts with the field's full name."""

    def __init__(self, field: str, message: str):
        super().__init__(f"config.{field}: {message}")
        self.field = field


def llama_mlp_hidden(width: int, multiple_of: int = 256) -> int:
    """SwiGLU hidden size by Llama's rule: 8/3 * width rounded up to `multiple_of`."""
    hidden = int(8 * width / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


def model_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # --- backbone (Llama-style: RMSNorm pre-norm, SwiGLU, RoPE) ---
    c.vocab_size = 32_000 + 2  # Llama 2's 32K sentencepiece + BOI/EOI appended
    c.pad_id = 0  # id placed at patch positions and padding; never a loss target
    c.width = 768  # d_model
    c.depth = 16  # transformer blocks
    c.num_heads = 12
    c.num_kv_heads = 0  # grouped-query attention: 0 = same as num_heads (plain MHA)
    c.mlp_hidden = 0  # SwiGLU hidden size; 0 = Llama's 8/3 * width rounded to 256
    c.rope_theta = 10_000.0
    c.norm_eps = 1e-5
    c.tie_embeddings = False  # Llama 2 unties the LM head from the embedding
    c.qk_norm = False  # RMSNorm on q and k per head: only for the Chameleon baseline
    c.init_std = 0.02  # std of normal init of embeddings and projections
    # --- numerics and memory ---
    # Compute dtype of activations and matmuls. Params (and Adam state) stay float32:
    # mixed precision casts them at use.
    c.dtype = "float32"
    c.scan_layers = True  # lax.scan over stacked layers (fast compile); False unrolls
    c.remat_policy = "none"  # one of REMAT_POLICIES (tfusion/model/transformer.py); per block
    # --- attention ---
    c.attention_kernel = "xla"  # one of ATTENTION_KERNELS (tfusion/kernels/__init__.py)
    # Paper: full attention among the patches of one image. "causal" is the ablation.
    c.image_attention = "bidirectional"
    # --- image modality layers ---
    c.latent_height = 32  # latent grid (paper: 256 px VAE f8 -> 32 x 32 x 8)
    c.latent_width = 32
    c.latent_channels = 8
    c.patch_size = 2  # k x k latent patches (paper default 2 -> 256 patches)
    c.modality_layer = "linear"  # "linear" or "unet"
    # U-Net (paper: down blocks in, up blocks out, LayerNorm instead of AdaLN;
    # ~0.27B params at paper scale). The paper gives no channel widths; these
    # defaults give 0.271B (encoder + decoder) at patch 2, width 4096 (0.262B at
    # width 768; checked in tests/test_unet.py). One entry per level: log2(k) + 1.
    c.unet_channels = (640, 1344)  # channels per level, fine to coarse
    c.unet_blocks_per_level = 2  # residual blocks per level
    c.timestep_embed_dim = 256  # sinusoidal features before the timestep MLP (U-Net)
    # --- how images enter the transformer (docs/experiments.md, "Chameleon baseline") ---
    # "continuous": Transfusion, VAE latent patches + diffusion loss. "discrete": the
    # Chameleon-style baseline, VQ code ids as ordinary tokens after the text vocabulary
    # (ids vocab_size - codebook_size .. vocab_size - 1), LM loss on every token, no
    # image slots in the batch (M = 0). The trainer needs no switch (an M = 0 batch has
    # no diffusion term); the data pipeline reads it.
    c.image_representation = "continuous"
    c.codebook_size = 0  # discrete: VQ codebook entries appended to the vocabulary
    c.image_tokens = 0  # discrete: VQ tokens per image (paper: 1024)
    return c


def diffusion_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Noising process (tfusion/diffusion.py). Paper: "ddpm". "flow" = rectified flow
    # (x_t = (1 - t) x0 + t eps, t in [0, 1]; SD3, the PyTorch peer).
    c.process = "ddpm"
    # What the model's image output means: "eps" (paper), "v" (ddpm: a eps - s x0,
    # Salimans & Ho; flow: the velocity eps - x0) or "x0". Loss, samplers, CFG and the
    # x0 clip convert exactly. At 3M parameters "eps" loses the high-noise steps that
    # lay out an image (docs/diffusion.md); the tiny experiments choose by measurement.
    c.prediction = "eps"
    # Per-image loss weighting: "none" (paper: plain MSE) or "min_snr" (Hang et al.
    # 2023: the x0-space loss weighted by min(SNR, gamma), written in the prediction's space).
    c.loss_weighting = "none"
    c.min_snr_gamma = 5.0
    # Training times: "uniform" (paper) or "logit_normal" (SD3: u = sigmoid(mean + std n),
    # mapped to the time axis exactly like a uniform u).
    c.timestep_sampling = "uniform"
    c.logit_normal_mean = 0.0
    c.logit_normal_std = 1.0
    # Log-SNR shift of the schedule (Hoogeboom et al. 2023): log SNR - 2 log(shift), for
    # training and sampling alike. 1 = the plain schedule; > 1 more noise (large images),
    # < 1 less (small images). For flow this is SD3's time shift.
    c.schedule_shift = 1.0
    c.num_train_steps = 1000  # T (ddpm steps; flow: the scale of the model's time input)
    c.schedule = "cosine"  # Nichol & Dhariwal cosine schedule (paper); ddpm only
    c.cosine_s = 0.008  # cosine schedule offset (Nichol & Dhariwal's value)
    c.max_beta = 0.999  # beta clip of the cosine schedule (Nichol & Dhariwal)
    c.loss_weight = 5.0  # lambda in L = L_LM + lambda * L_DDPM (paper: 5)
    # Image-first caption pairs are noised at t <= this (paper's noise limiting); flow:
    # at t <= noise_limit_t / (T - 1) before the shift.
    c.noise_limit_t = 500
    # Paper does not give the CFG caption-dropout rate; 0.1 is the common choice.
    c.cfg_dropout = 0.1
    c.sample_steps = 250  # sampler steps at inference (paper: 250 respaced DDPM steps)
    # ddpm process: "ddpm" (ancestral, paper) or "ddim"; flow: "euler" or "heun".
    c.sampler = "ddpm"
    c.cfg_scale = 3.0  # paper: 3-5
    return c


def loss_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.z_loss_weight = 0.0  # Chameleon baseline uses z-loss (1e-5); Transfusion none
    return c


def is_discrete(model_cfg) -> bool:
    """The Chameleon-style baseline: images are VQ code tokens, not latents."""
    return getattr(model_cfg, "image_representation", "continuous") == "discrete"


def image_token_offset(model_cfg):
    """Id of VQ code 0 for the discrete (Chameleon) baseline, whose codes follow the
    text vocabulary (BOI/EOI included); None for Transfusion's continuous images."""
    if not is_discrete(model_cfg):
        return None
    return int(model_cfg.vocab_size - model_cfg.codebook_size)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """config.model, typed and validated (ConfigError naming the field) on construction.

    Fields are model_config()'s (documented there); `ModelConfig.of(config.model)`
    converts. Frozen and hashable, so jitted functions can take it as a static argument.
    """
    vocab_size: int
    pad_id: int
    width: int
    depth: int
    num_heads: int
    num_kv_heads: int  # 0 = num_heads
    mlp_hidden: int  # 0 = Llama's rule
    rope_theta: float
    norm_eps: float
    tie_embeddings: bool
    qk_norm: bool
    init_std: float
    dtype: str
    scan_layers: bool
    remat_policy: str
    attention_kernel: str
    image_attention: str
    latent_height: int
    latent_width: int
    latent_channels: int
    patch_size: int
    modality_layer: str
    unet_channels: tuple
    unet_blocks_per_level: int
    timestep_embed_dim: int
    image_representation: str
    codebook_size: int
    image_tokens: int

    @classmethod
    def of(cls, model_cfg, prefix: str = "model") -> "ModelConfig":
        """From a ConfigDict (or a mapping); a ModelConfig is returned as is."""
        if isinstance(model_cfg, cls):
            return model_cfg
        values = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
        names = {f.name for f in dataclasses.fields(cls)}
        for field in sorted(set(values) - names):
            raise ConfigError(f"{prefix}.{field}", f"unknown field; known: {sorted(names)}")
        for field in sorted(names - set(values)):
            raise ConfigError(f"{prefix}.{field}", "missing (see tfusion/config.py model_config)")
        values["unet_channels"] = tuple(values["unet_channels"])
        config = cls(**values)
        config.validate(prefix)
        return config

    def to_dict(self) -> dict:
        """The fields as a plain dict (what config.json and checkpoints record)."""
        return dataclasses.asdict(self)

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

    # --- validation ---

    def validate(self, prefix: str = "model") -> None:
        """Raises ConfigError naming the first bad field."""

        def fail(field, msg):
            raise ConfigError(f"{prefix}.{field}", msg)

        for field in ("vocab_size", "width", "depth", "num_heads", "latent_height",
                      "latent_width", "latent_channels", "patch_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                fail(field, f"must be a positive int, got {value!r}")
        if self.width % self.num_heads:
            fail("width", f"{self.width} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2:
            fail("num_heads", f"head dim {self.head_dim} must be even for RoPE")
        if self.num_kv_heads < 0 or self.num_heads % self.kv_heads:
            fail("num_kv_heads", f"{self.num_kv_heads} must divide num_heads={self.num_heads}")
        if self.mlp_hidden < 0:
            fail("mlp_hidden", f"must be >= 0, got {self.mlp_hidden}")
        if not 0 <= self.pad_id < self.vocab_size:
            fail("pad_id", f"{self.pad_id} is outside the vocabulary [0, {self.vocab_size})")
        for field in ("latent_height", "latent_width"):
            if getattr(self, field) % self.patch_size:
                fail("patch_size", f"{self.patch_size} does not divide "
                                   f"{field}={getattr(self, field)}")
        if self.modality_layer not in MODALITY_LAYERS:
            fail("modality_layer", f"unknown {self.modality_layer!r}; choose from "
                                   f"{MODALITY_LAYERS}")
        if self.modality_layer == "unet":
            if self.patch_size & (self.patch_size - 1):
                fail("patch_size", f"U-Net downsamples by 2 per level; {self.patch_size} "
                                   "is not a power of 2")
            levels = int(math.log2(self.patch_size)) + 1
            if len(self.unet_channels) != levels:
                fail("unet_channels", f"needs log2(patch_size)+1 = {levels} levels, got "
                                      f"{len(self.unet_channels)}")
            if any(ch % 32 for ch in self.unet_channels):
                fail("unet_channels", "each level's channels must be a multiple of 32")
        choices = dict(remat_policy=REMAT_POLICIES, image_attention=IMAGE_ATTENTION,
                       dtype=DTYPES, attention_kernel=ATTENTION_KERNELS,
                       image_representation=IMAGE_REPRESENTATIONS)
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                fail(field, f"unknown {getattr(self, field)!r}; choose from {allowed}")


def validate_model_config(c, prefix: str = "model") -> ModelConfig:
    """Raises ConfigError naming the first bad field; returns the typed config."""
    return ModelConfig.of(c, prefix)


def validate_diffusion_config(c: ml_collections.ConfigDict, prefix: str = "diffusion") -> None:
    def fail(field, msg):
        raise ConfigError(f"{prefix}.{field}", msg)

    if c.num_train_steps <= 1:
        fail("num_train_steps", f"must be > 1, got {c.num_train_steps}")
    if c.schedule not in SCHEDULES:
        fail("schedule", f"unknown {c.schedule!r}; choose from {SCHEDULES}")
    if not 0 <= c.noise_limit_t < c.num_train_steps:
        fail("noise_limit_t", f"{c.noise_limit_t} outside [0, {c.num_train_steps})")
    if not 0.0 <= c.cfg_dropout < 1.0:
        fail("cfg_dropout", f"{c.cfg_dropout} outside [0, 1)")
    if c.loss_weight < 0:
        fail("loss_weight", f"must be >= 0, got {c.loss_weight}")
    if not 0 < c.sample_steps <= c.num_train_steps:
        fail("sample_steps", f"{c.sample_steps} outside (0, {c.num_train_steps}]")
    choices = dict(process=diffusion.PROCESSES, prediction=diffusion.PREDICTIONS,
                   loss_weighting=diffusion.LOSS_WEIGHTINGS,
                   timestep_sampling=diffusion.TIMESTEP_SAMPLINGS)
    for field, allowed in choices.items():
        if c.get(field) not in allowed:
            fail(field, f"unknown {c.get(field)!r}; choose from {allowed}")
    samplers = diffusion.SAMPLERS_BY_PROCESS[c.process]
    if c.sampler not in samplers:
        fail("sampler", f"{c.sampler!r} does not sample process={c.process!r}; choose from "
                        f"{samplers}")
    if c.min_snr_gamma <= 0:
        fail("min_snr_gamma", f"must be > 0, got {c.min_snr_gamma}")
    if c.logit_normal_std <= 0:
        fail("logit_normal_std", f"must be > 0, got {c.logit_normal_std}")
    if not c.schedule_shift > 0:
        fail("schedule_shift", f"must be > 0, got {c.schedule_shift}")
