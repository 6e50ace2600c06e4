"""The sampling flags launch.generate and launch.evaluate share: --sampler, --spacing,
--cfg_interval (each defaults to the run's config.diffusion)."""
from __future__ import annotations

from absl import flags

SAMPLER = flags.DEFINE_enum("sampler", None, ["ddpm", "ddim", "dpmpp_2m", "euler", "heun"],
                            "Default: config.diffusion.sampler (ddpm/ddim/dpmpp_2m for "
                            "process ddpm, euler/heun/dpmpp_2m for flow).")
SPACING = flags.DEFINE_enum("spacing", None, ["linspace", "trailing", "logsnr"],
                            "Where the sampler's levels lie; default "
                            "config.diffusion.sample_spacing.")
CFG_INTERVAL = flags.DEFINE_list("cfg_interval", None,
                                 "lo,hi: CFG only at noise levels s in [lo, hi] (0,1 = every "
                                 "step); default config.diffusion.cfg_interval.")


def apply_to(config) -> None:
    """Writes the given flags into config.diffusion; ConfigError names a field that does
    not fit the run (tfusion.eval.checkpoints.override_sampling)."""
    from tfusion.eval.checkpoints import override_sampling

    override_sampling(config, SAMPLER.value, SPACING.value, CFG_INTERVAL.value)
