"""VQ-VAE for the Chameleon-style discrete baseline (diffusers VQModel layout).

encoder -> quant_conv (1x1) -> nearest codebook entry -> post_quant_conv (1x1) ->
decoder. Training uses the straight-through estimator: the decoder sees the code
vector, the encoder receives the decoder's gradient unchanged. Losses (van den Oord
et al. 2017): codebook ||sg(z) - e||^2 moves codes to the encoder outputs,
commitment beta * ||z - sg(e)||^2 keeps the encoder near its codes (beta = 0.25).
Token ids are [N, h, w] int32, row-major over the latent grid.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tfusion.autoencoders.config import AutoencoderConfig
from tfusion.autoencoders.encoder_decoder import Decoder, Encoder
from tfusion.autoencoders.layers import vae_conv

COMMITMENT_BETA = 0.25


class Quantized(NamedTuple):
    codes: jax.Array  # straight-through code vectors [N, h, w, D]
    ids: jax.Array  # int32 [N, h, w]
    codebook_loss: jax.Array  # scalar
    commitment_loss: jax.Array  # scalar, beta already applied


def nearest_code(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """ids of the codebook rows nearest to z [..., D] in L2 (float32)."""
    z = z.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    # |z - e|^2 = |z|^2 - 2 z.e + |e|^2; |z|^2 does not change the argmin.
    dist = jnp.sum(codebook ** 2, axis=-1) - 2.0 * jnp.einsum("...d,kd->...k", z, codebook)
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def quantize(z: jax.Array, codebook: jax.Array, beta: float = COMMITMENT_BETA) -> Quantized:
    z = z.astype(jnp.float32)
    ids = nearest_code(z, codebook)
    e = codebook[ids].astype(jnp.float32)
    codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z) - e))
    commitment_loss = beta * jnp.mean(jnp.square(z - jax.lax.stop_gradient(e)))
    codes = z + jax.lax.stop_gradient(e - z)  # forward: e; backward: identity to z
    return Quantized(codes, ids, codebook_loss, commitment_loss)


def codebook_usage(ids: jax.Array, codebook_size: int) -> dict[str, jax.Array]:
    """Fraction of codes used in `ids` and the perplexity (exp entropy) of their use."""
    counts = jnp.bincount(ids.reshape(-1), length=codebook_size)
    probs = counts / ids.size
    entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.maximum(probs, 1e-12)), 0.0))
    return {"codebook_used": jnp.mean(counts > 0), "codebook_perplexity": jnp.exp(entropy)}


class Codebook(nnx.Module):
    """`embedding` [K, D]: diffusers' quantize.embedding.weight."""

    def __init__(self, size: int, dim: int, *, rngs: nnx.Rngs):
        # Unit normal, the scale of a freshly initialised encoder's outputs: the VQ-VAE
        # reference's Uniform(-1/K, 1/K) puts every code near 0, the few nearest the
        # data win every assignment and the rest never train (measured on shapes:
        # 6 of 256 codes used after 25 steps).
        self.embedding = nnx.Param(jax.random.normal(rngs.params(), (size, dim), jnp.float32),
                                   logical_axes=("vae_codebook", "vae_out"))


class VQModel(nnx.Module):
    def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs, dtype: str = "float32"):
        self.cfg = cfg
        dim = cfg.code_dim
        self.encoder = Encoder(cfg, cfg.latent_channels, rngs=rngs, dtype=dtype)
        self.quant_conv = vae_conv(cfg.latent_channels, dim, size=1, rngs=rngs, dtype=dtype)
        self.quantize = Codebook(cfg.num_vq_embeddings, dim, rngs=rngs)
        self.post_quant_conv = vae_conv(dim, cfg.latent_channels, size=1, rngs=rngs, dtype=dtype)
        self.decoder = Decoder(cfg, rngs=rngs, dtype=dtype)

    def encode_z(self, images: jax.Array) -> jax.Array:
        return self.quant_conv(self.encoder(images)).astype(jnp.float32)

    def decode_codes(self, codes: jax.Array) -> jax.Array:
        return self.decoder(self.post_quant_conv(codes)).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, Quantized]:
        """Training forward: (reconstruction, quantizer outputs and losses)."""
        q = quantize(self.encode_z(images), self.quantize.embedding[...])
        return self.decode_codes(q.codes), q

    def init_codebook_from(self, images: jax.Array, key: jax.Array) -> None:
        """Sets the codes to encoder outputs of `images` (K drawn with replacement when
        the batch has fewer vectors): every code starts where data is, so fewer codes
        die before their first assignment."""
        z = self.encode_z(images).reshape(-1, self.cfg.code_dim)
        rows = jax.random.choice(key, z.shape[0], (self.cfg.num_vq_embeddings,),
                                 replace=z.shape[0] < self.cfg.num_vq_embeddings)
        self.quantize.embedding.value = z[rows]

    def encode_ids(self, images: jax.Array) -> jax.Array:
        return nearest_code(self.encode_z(images), self.quantize.embedding[...])

    def decode_ids(self, ids: jax.Array) -> jax.Array:
        return self.decode_codes(self.quantize.embedding[...][ids])
