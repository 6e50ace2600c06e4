"""What a generation call may vary, and the special token ids it needs."""
from __future__ import annotations

import dataclasses

from tfusion.inference.diffusion_samplers import SAMPLERS, SPACINGS


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 64  # sampled tokens per row (BOI and EOS included)
    max_images: int = 1  # images a row may start by sampling BOI (prompt BOIs are extra)
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    cfg_scale: float | None = 3.0  # None: no unconditional stream (pure conditional)
    steps: int = 250  # respaced diffusion steps (of diffusion.num_train_steps)
    # ddpm process: "ddpm" (ancestral), "ddim" (eta = 0), "dpmpp_2m"; flow: "euler",
    # "heun", "dpmpp_2m" (config.DiffusionConfig.sampler)
    sampler: str = "ddpm"
    spacing: str = "linspace"  # where the K levels lie (DiffusionConfig.sample_spacing)
    # CFG only at noise levels s in [lo, hi]; (0, 1) = every step (DiffusionConfig)
    cfg_interval: tuple = (0.0, 1.0)
    # Clip predicted x0 to [-c, c]; 1.0 suits pixel latents in [-1, 1], None for VAEs.
    clip_denoised: float | None = None
    max_len: int | None = None  # cache length; None = enough for the worst case
    # Diffusion steps per compiled call (steps.diffusion_steps, a lax.fori_loop):
    # 0 = all of an image's steps in one program (with a progress callback: 10 chunks,
    # one progress update each); 1 = one jitted call per step, the reference path.
    steps_per_call: int = 0
    # The discrete (Chameleon) baseline samples an image's VQ codes with these
    # (text keeps temperature / top_k above): greedy codes collapse to flat images.
    image_temperature: float = 1.0
    image_top_k: int = 0

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler: unknown {self.sampler!r}; choose from {SAMPLERS}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing: unknown {self.spacing!r}; choose from {SPACINGS}")
        lo, hi = self.cfg_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"cfg_interval: need 0 <= lo <= hi <= 1, got {self.cfg_interval}")
        object.__setattr__(self, "cfg_interval", (float(lo), float(hi)))  # hashable, static
        if self.max_new_tokens < 0 or self.max_images < 0 or self.steps <= 0:
            raise ValueError("max_new_tokens, max_images must be >= 0 and steps > 0")
        if self.steps_per_call < 0:
            raise ValueError(f"steps_per_call must be >= 0, got {self.steps_per_call}")

    @classmethod
    def from_config(cls, config, **overrides) -> "GenerationOptions":
        """Defaults from config.diffusion (sample_steps, sampler, sample_spacing,
        cfg_scale, cfg_interval; a run saved before a field existed gets its default)."""
        d = config.diffusion
        base = dict(cfg_scale=d.cfg_scale, steps=d.sample_steps, sampler=d.sampler,
                    spacing=d.get("sample_spacing", "linspace"),
                    cfg_interval=tuple(d.get("cfg_interval", (0.0, 1.0))))
        return cls(**{**base, **overrides})


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    pad: int
    bos: int
    eos: int
    boi: int
    eoi: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialTokens":
        return cls(tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id,
                   tokenizer.boi_id, tokenizer.eoi_id)
