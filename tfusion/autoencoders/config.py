"""Architecture config of the autoencoders, spelled like diffusers' config.json.

`AutoencoderConfig` carries the fields of diffusers' `AutoencoderKL` (and the two
`VQModel` extras) that change the architecture or the latent scaling, under the same
names, so a diffusers `config.json` loads with `from_diffusers_dict` and our trained
models save one diffusers can read. Known shapes:

  SD-VAE f8c4:  block_out_channels (128, 256, 512, 512), latent_channels 4,
                scaling_factor 0.18215, quant convs on.
  FLUX f8c16:   same widths, latent_channels 16, scaling_factor 0.3611,
                shift_factor 0.1159, no quant / post-quant convs.
  paper f8c8:   same widths, latent_channels 8 (256 px -> 32x32x8).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # one entry per level
    layers_per_block: int = 2  # resnets per encoder level (decoder levels have one more)
    latent_channels: int = 4
    norm_num_groups: int = 32  # GroupNorm groups everywhere (must divide every width)
    mid_block_add_attention: bool = True  # self-attention between the two mid resnets
    use_quant_conv: bool = True  # 1x1 conv after the encoder (FLUX: off)
    use_post_quant_conv: bool = True  # 1x1 conv before the decoder (FLUX: off)
    # Model-facing latent = (z - shift_factor) * scaling_factor; None shift means 0.
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    # VQ only (diffusers VQModel): codebook size and code width (None = latent_channels).
    num_vq_embeddings: int = 16384
    vq_embed_dim: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        for width in self.block_out_channels:
            if width % self.norm_num_groups:
                raise ValueError(f"norm_num_groups={self.norm_num_groups} does not divide "
                                 f"block width {width}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def shift(self) -> float:
        return 0.0 if self.shift_factor is None else float(self.shift_factor)

    @property
    def code_dim(self) -> int:
        return self.vq_embed_dim or self.latent_channels

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        if image_size % self.downsample_factor:
            raise ValueError(f"image size {image_size} is not divisible by the "
                             f"downsample factor {self.downsample_factor}")
        side = image_size // self.downsample_factor
        return side, side, self.latent_channels

    def to_diffusers_dict(self, class_name: str = "AutoencoderKL") -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["block_out_channels"] = list(self.block_out_channels)
        out["down_block_types"] = [_DOWN_BLOCK] * len(self.block_out_channels)
        out["up_block_types"] = [_UP_BLOCK] * len(self.block_out_channels)
        out["act_fn"] = "silu"
        out["_class_name"] = class_name
        if class_name == "VQModel":  # VQModel has neither switch nor a shift
            for key in ("use_quant_conv", "use_post_quant_conv", "shift_factor"):
                out.pop(key)
        else:
            out.pop("num_vq_embeddings")
            out.pop("vq_embed_dim")
        return out


def from_diffusers_dict(raw: Mapping[str, Any]) -> AutoencoderConfig:
    """Reads a diffusers AutoencoderKL / VQModel config.json dict (unknown keys ignored)."""
    for key, wanted in (("down_block_types", _DOWN_BLOCK), ("up_block_types", _UP_BLOCK)):
        kinds = set(raw.get(key, [wanted]))
        if kinds != {wanted}:
            raise ValueError(f"{key}={sorted(kinds)}: only {wanted} is supported")
    if raw.get("act_fn", "silu") != "silu":
        raise ValueError(f"act_fn={raw['act_fn']!r}: only silu is supported")
    if raw.get("norm_type", "group") != "group":
        raise ValueError(f"norm_type={raw['norm_type']!r}: only group norm is supported")
    if raw.get("latents_mean") is not None:
        raise ValueError("per-channel latents_mean/latents_std scaling is not supported")
    fields = {f.name for f in dataclasses.fields(AutoencoderConfig)}
    return AutoencoderConfig(**{k: v for k, v in raw.items() if k in fields})
