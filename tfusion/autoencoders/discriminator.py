"""A small PatchGAN discriminator: one real/fake logit per receptive-field patch."""
from __future__ import annotations

import jax
from flax import nnx

from tfusion.autoencoders.layers import vae_conv, GroupNorm

_HALVE = ((1, 1), (1, 1))  # 4x4 stride-2 conv with this padding halves H and W exactly


class PatchDiscriminator(nnx.Module):
    """images [N, H, W, 3] -> logits [N, H / 2**layers, W / 2**layers, 1]."""

    def __init__(self, channels: int = 32, layers: int = 2, groups: int = 8, *,
                 rngs: nnx.Rngs):
        convs, norms, c_in = [], [], 3
        for i in range(layers):
            c_out = channels * 2 ** i
            convs.append(vae_conv(c_in, c_out, size=4, stride=2, padding=_HALVE, rngs=rngs))
            # No norm on the first layer (PatchGAN); GroupNorm, not BatchNorm, so the
            # discriminator is a pure function of its params.
            norms.append(GroupNorm(groups, c_out) if i else None)
            c_in = c_out
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        self.head = vae_conv(c_in, 1, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = images
        for conv, norm in zip(self.convs, self.norms):
            x = conv(x)
            x = jax.nn.leaky_relu(norm(x) if norm is not None else x, 0.2)
        return self.head(x)
