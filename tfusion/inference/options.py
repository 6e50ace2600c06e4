"""What a generation call may vary, and the special token ids it needs."""
from __future__ import annotations

import dataclasses

from tfusion.inference.diffusion_samplers import SAMPLERS


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 64  # sampled tokens per row (BOI and EOS included)
    max_images: int = 1  # images a row may start by sampling BOI (prompt BOIs are extra)
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    cfg_scale: float | None = 3.0  # None: no unconditional stream (pure conditional)
    steps: int = 250  # respaced diffusion steps (of diffusion.num_train_steps)
    sampler: str = "ddpm"  # ddpm process: "ddpm" (ancestral), "ddim" (eta = 0); flow: "euler", "heun"
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
        if self.max_new_tokens < 0 or self.max_images < 0 or self.steps <= 0:
            raise ValueError("max_new_tokens, max_images must be >= 0 and steps > 0")
        if self.steps_per_call < 0:
            raise ValueError(f"steps_per_call must be >= 0, got {self.steps_per_call}")

    @classmethod
    def from_config(cls, config, **overrides) -> "GenerationOptions":
        """Defaults from config.diffusion (sample_steps, sampler, cfg_scale)."""
        d = config.diffusion
        base = dict(cfg_scale=d.cfg_scale, steps=d.sample_steps, sampler=d.sampler)
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
