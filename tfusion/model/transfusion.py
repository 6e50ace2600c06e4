"""The Transfusion model: text embedding + image modality layers around one transformer.

Forward (training and full-sequence evaluation):
  1. text tokens are embedded; noisy latents of every image slot are encoded into
     P patch embeddings each (linear or U-Net modality layer, conditioned on t);
  2. patch embeddings are gathered into the sequence where image_index >= 0;
  3. the transformer runs with the Transfusion mask (causal + full within images,
     nothing across documents);
  4. logits come from the LM head at every position; per-image hidden states are
     gathered back at image_start .. image_start + P - 1 and decoded into the
     diffusion prediction (epsilon, v or x0: config.diffusion.prediction).

The paper's `linear` modality layers are here (patchify, add an embedding of t, one
linear in; one linear out, unpatchify); the U-Net ones are in tfusion/model/unet.py.

Image capacity (`ImageCapacity`, data.image_capacity_per_row): the modality layers
run on the images present, not on all B x M slots. The batch's rows form `groups`
equal groups of consecutive rows (one per batch shard: each device compacts its own
rows, no communication); in each, the first `per_group` present slots (in slot order)
are gathered, encoded and decoded, and the results scattered back; empty slots get
zeros. The input pipeline packs at most `per_group` images into each group, so no
image is ever left out (a batch holding more would be a contract violation).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from tfusion import attention
from tfusion.config import ModelConfig
from tfusion.model.layers import (Dense, RMSNorm, TimestepMLP, dtype_of, make_param, patchify,
                                  rope_angles, rope_inv_freq, unpatchify)
from tfusion.model.transformer import (BlockContext, Transformer, modality_norm,
                                       route_by_modality)
from tfusion.sharding import constrain
from tfusion.model.unet import UNetDecoder, UNetEncoder

# The logit of every padded id (vocab_size .. padded_vocab_size - 1): exp() of it is 0
# in float32 next to any real logit, so it never enters a softmax, a loss or a sample;
# finite, so differences and 0 * logit stay finite (no inf - inf).
PAD_LOGIT = -1e30


def pad_vocab(param: nnx.Param, size: int, axis: int) -> nnx.Param:
    """`param` with zero rows appended along its vocab `axis` up to `size`. The real rows
    are drawn exactly as an unpadded model's (same shape, same key), so padding changes
    no weight; the padded ones are never looked up, get no gradient and stay 0."""
    value = param[...]
    widths = [(0, 0)] * value.ndim
    widths[axis] = (0, size - value.shape[axis])
    return nnx.Param(jnp.pad(value, widths), logical_axes=param.get_metadata()["logical_axes"])


class LinearPatchEncoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.k = cfg.patch_size
        self.t_embed = TimestepMLP(cfg.timestep_embed_dim, cfg.patch_dim, "patch",
                                   rngs=rngs, dtype=cfg.dtype)
        self.proj = Dense(cfg.patch_dim, (cfg.width,), ("patch", "embed"), rngs=rngs,
                          use_bias=True, dtype=cfg.dtype)

    def __call__(self, latents: jax.Array, t: jax.Array):
        """latents [N, H, W, C], t [N] -> (patch embeddings [N, P, D], no skips)."""
        x = patchify(latents, self.k) + self.t_embed(t)[:, None, :]
        return self.proj(x), ()


class LinearPatchDecoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.k, self.h, self.w = cfg.patch_size, cfg.latent_height, cfg.latent_width
        # Zero init: the untrained model predicts eps = 0, the MSE starts at 1.
        self.proj = Dense(cfg.width, (cfg.patch_dim,), ("embed", "patch"), rngs=rngs,
                          std=0.0, use_bias=True, dtype=cfg.dtype)

    def __call__(self, hidden: jax.Array, skips, t: jax.Array) -> jax.Array:
        """hidden [N, P, D] -> the image prediction [N, H, W, C] in float32."""
        del skips, t
        out = self.proj(hidden).astype(jnp.float32)
        return unpatchify(out, self.k, self.h, self.w)


def linear_flops_per_image(cfg: ModelConfig) -> int:
    """Forward matmul FLOPs of the linear encoder + decoder for one image."""
    return 2 * 2 * cfg.patches_per_image * cfg.patch_dim * cfg.width


class ImageCapacity(NamedTuple):
    """The rows form `groups` groups of consecutive rows, each holding at most
    `per_group` images: the modality layers run on groups x per_group images."""

    groups: int
    per_group: int


class ActiveSlots(NamedTuple):
    """Which slots the modality layers run on: `order` [G, per_group] slot indices
    within each group's flattened (rows x M) slots, present ones first in slot order."""

    order: jax.Array
    slots_per_group: int


def active_slots(image_mask: jax.Array, capacity: ImageCapacity) -> ActiveSlots:
    b, m = image_mask.shape
    if b % capacity.groups:
        raise ValueError(f"{b} rows do not split into {capacity.groups} image groups")
    per_group = b // capacity.groups * m
    if capacity.per_group > per_group:
        raise ValueError(f"image capacity {capacity.per_group} exceeds the group's "
                         f"{per_group} slots")
    present = image_mask.reshape(capacity.groups, per_group)
    # Stable: present slots first, in slot order; the tail (absent) is never read.
    order = jnp.argsort(~present, axis=1, stable=True)[:, :capacity.per_group]
    return ActiveSlots(order.astype(jnp.int32), per_group)


def gather_slots(x: jax.Array, active: ActiveSlots) -> jax.Array:
    """[B, M, ...] -> the active slots' [G * per_group, ...], grouped like `active`."""
    g, c = active.order.shape
    grouped = x.reshape(g, active.slots_per_group, *x.shape[2:])
    idx = active.order.reshape(g, c, *([1] * (x.ndim - 2)))
    out = jnp.take_along_axis(grouped, idx, axis=1)
    out = constrain(out, ("activation_batch",) + (None,) * (out.ndim - 1))
    return out.reshape(g * c, *x.shape[2:])


def scatter_slots(y: jax.Array, active: ActiveSlots, rows: int, m: int) -> jax.Array:
    """The active slots' [G * per_group, ...] -> [rows, M, ...], zeros elsewhere."""
    g, c = active.order.shape
    y = y.reshape(g, c, *y.shape[1:])
    out = jnp.zeros((g, active.slots_per_group, *y.shape[2:]), y.dtype)
    out = jax.vmap(lambda o, idx, v: o.at[idx].set(v))(out, active.order, y)
    return out.reshape(rows, m, *y.shape[2:])


def image_twin_of(path: tuple) -> Optional[tuple]:
    """The text weight's path an untied image twin copies (backbone, blocks, attn,
    image_qkv, kernel -> backbone, blocks, attn, qkv, kernel); None for any other param.
    The image encoder and decoder are not twins: they have no text counterpart."""
    for i, part in enumerate(path):
        if (isinstance(part, str) and part.startswith("image_")
                and part not in ("image_encoder", "image_decoder")):
            return path[:i] + (part[len("image_"):],) + path[i + 1:]
    return None


def copy_text_to_image(params, names=None):
    """params (an nnx.State or a nested dict) with every untied image twin set to a copy
    of its text weight; `names`: only the twins with those dotted names."""
    pure = params.to_pure_dict() if isinstance(params, nnx.State) else params
    flat = nnx.traversals.flatten_mapping(pure)
    for path in list(flat):
        text = image_twin_of(path)
        if text is not None and (names is None or ".".join(map(str, path)) in names):
            flat[path] = jnp.copy(flat[text])
    nested = nnx.traversals.unflatten_mapping(flat)
    if isinstance(params, nnx.State):
        params.replace_by_pure_dict(nested)
        return params
    return nested


def make_image_layers(cfg: ModelConfig, rngs: nnx.Rngs):
    if cfg.modality_layer == "linear":
        return LinearPatchEncoder(cfg, rngs=rngs), LinearPatchDecoder(cfg, rngs=rngs)
    return UNetEncoder(cfg, rngs=rngs), UNetDecoder(cfg, rngs=rngs)


class Transfusion(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        """cfg: config.model (a ConfigDict; validated into a ModelConfig) or a ModelConfig."""
        self.cfg = cfg = ModelConfig.of(cfg)
        self.patches_per_image = cfg.patches_per_image
        # padded_vocab_size rows (tfusion/config.py): the vocab axis shards evenly.
        self.embed = pad_vocab(make_param(rngs, (cfg.vocab_size, cfg.width), ("vocab", "embed"),
                                          cfg.init_std), cfg.padded_vocab_size, 0)
        self.backbone = Transformer(cfg, rngs=rngs)
        self.final_norm = RMSNorm(cfg.width, "embed", cfg.norm_eps, cfg.dtype)
        self.image_final_norm = (RMSNorm(cfg.width, "embed", cfg.norm_eps, cfg.dtype)
                                 if cfg.modality_weights == "untied" else None)
        self.lm_head = None if cfg.tie_embeddings else Dense(
            cfg.width, (cfg.vocab_size,), ("embed", "vocab"), rngs=rngs,
            std=cfg.init_std, dtype=cfg.dtype)
        if self.lm_head is not None:
            self.lm_head.kernel = pad_vocab(self.lm_head.kernel, cfg.padded_vocab_size, 1)
        self.image_encoder, self.image_decoder = make_image_layers(cfg, rngs)
        if cfg.modality_weights == "untied" and cfg.untied_init == "copy":
            nnx.update(self, copy_text_to_image(nnx.state(self, nnx.Param)))

    # --- pieces, reused by cached inference ---

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed[...], tokens, axis=0).astype(dtype_of(self.cfg.dtype))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final hidden [B, L, D] (already normed) -> float32 logits [B, L, V], V =
        padded_vocab_size; the padded ids' logits are PAD_LOGIT. The vocab axis stays
        whole and sharded (slicing it to vocab_size would gather it)."""
        if self.lm_head is None:
            out = jnp.einsum("bld,vd->blv", hidden, self.embed[...].astype(hidden.dtype))
        else:
            out = self.lm_head(hidden)
        out = constrain(out, ("activation_batch", "activation_length", "activation_vocab"),
                        what="logits").astype(jnp.float32)
        if self.cfg.padded_vocab_size > self.cfg.vocab_size:
            ids = jax.lax.broadcasted_iota(jnp.int32, out.shape, out.ndim - 1)
            out = jnp.where(ids < self.cfg.vocab_size, out, PAD_LOGIT)
        return out

    def encode_images(self, latents: jax.Array, t: jax.Array,
                      active: Optional[ActiveSlots] = None):
        """latents [B, M, H, W, C], model times t [B, M] (float; the ddpm step, or flow
        t * (T - 1)) -> (patch embeddings [B, M, P, D], skips). With `active`, only
        those slots are encoded (zeros elsewhere) and the skips are theirs."""
        b, m = latents.shape[:2]
        if active is None:
            emb, skips = self.image_encoder(latents.reshape(b * m, *latents.shape[2:]),
                                            t.reshape(b * m))
            return emb.reshape(b, m, *emb.shape[1:]), skips
        emb, skips = self.image_encoder(gather_slots(latents, active), gather_slots(t, active))
        return scatter_slots(emb, active, b, m), skips

    def decode_images(self, hidden: jax.Array, skips, t: jax.Array,
                      active: Optional[ActiveSlots] = None) -> jax.Array:
        """hidden [B, M, P, D] -> the image prediction [B, M, H, W, C] (float32); with
        `active`, decoded at those slots only (zeros elsewhere)."""
        b, m = hidden.shape[:2]
        if active is None:
            eps = self.image_decoder(hidden.reshape(b * m, *hidden.shape[2:]), skips,
                                     t.reshape(b * m))
            return eps.reshape(b, m, *eps.shape[1:])
        eps = self.image_decoder(gather_slots(hidden, active), skips, gather_slots(t, active))
        return scatter_slots(eps, active, b, m)

    def mask_info(self, segment_ids, image_index) -> attention.MaskInfo:
        return attention.MaskInfo.from_batch(
            segment_ids, image_index, self.patches_per_image,
            bidirectional_images=self.cfg.image_attention == "bidirectional")

    def context(self, positions, mask: attention.MaskInfo, cache_index=None,
                is_image: Optional[jax.Array] = None) -> BlockContext:
        """is_image bool [B, L]: the positions untied modality weights route to the image
        twins (ignored with shared weights; None: none). Routed in tiles, except in cached decoding
        (cache_index given), whose few positions per row select per position."""
        c = self.cfg
        inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling, c.rope_scaling_factor,
                                 c.rope_low_freq_factor, c.rope_high_freq_factor,
                                 c.rope_original_max_positions)
        sin, cos = rope_angles(positions, c.head_dim, c.rope_theta, inv_freq)
        routing = None
        if c.modality_weights == "untied":
            if is_image is None:  # a text-only forward
                is_image = jnp.zeros(positions.shape, bool)
            routing = route_by_modality(is_image, c.untied_tile, tiled=cache_index is None)
        return BlockContext(sin=sin, cos=cos, mask=mask, cache_index=cache_index,
                            routing=routing)

    def norm_final(self, hidden: jax.Array, is_image: Optional[jax.Array] = None) -> jax.Array:
        """The final RMSNorm (untied weights: the image twin at image positions)."""
        return modality_norm(self.final_norm, self.image_final_norm, hidden, is_image)

    def mix_inputs(self, tokens, image_index, patch_emb) -> jax.Array:
        """Sequence inputs: token embeddings, replaced by patch embeddings at patches."""
        b, m, p, d = patch_emb.shape
        x = self.embed_tokens(tokens)
        flat = patch_emb.reshape(b, m * p, d).astype(x.dtype)
        # Gather (not scatter): each position reads its patch row; stays shard-local.
        gathered = jnp.take_along_axis(flat, jnp.clip(image_index, 0)[..., None], axis=1)
        x = jnp.where((image_index >= 0)[..., None], gathered, x)
        return constrain(x, ("activation_batch", "activation_length", "activation_embed"))

    def gather_image_hidden(self, hidden, image_start) -> jax.Array:
        """hidden [B, L, D], image_start [B, M] -> [B, M, P, D]."""
        idx = image_start[:, :, None] + jnp.arange(self.patches_per_image)
        idx = jnp.clip(idx, 0, hidden.shape[1] - 1)  # empty slots read anything; masked later
        b, m, p = idx.shape
        out = jnp.take_along_axis(hidden, idx.reshape(b, m * p)[..., None], axis=1)
        return out.reshape(b, m, p, hidden.shape[-1])

    # --- full forward ---

    def __call__(self, batch: dict, noisy_images: jax.Array, t: jax.Array,
                 capacity: Optional[ImageCapacity] = None):
        """batch: contract arrays; noisy_images [B, M, H, W, C]; model times t [B, M];
        capacity: run the modality layers on at most that many images per row group
        (None: on every slot).

        Returns (logits float32 [B, L, V], image prediction float32 [B, M, H, W, C]).
        """
        active = None if capacity is None else active_slots(batch["image_mask"], capacity)
        patch_emb, skips = self.encode_images(noisy_images, t, active)
        x = self.mix_inputs(batch["tokens"], batch["image_index"], patch_emb)
        is_image = batch["image_index"] >= 0
        ctx = self.context(batch["positions"],
                           self.mask_info(batch["segment_ids"], batch["image_index"]),
                           is_image=is_image)
        hidden, _ = self.backbone(x, ctx)
        hidden = self.norm_final(hidden, is_image)
        eps = self.decode_images(self.gather_image_hidden(hidden, batch["image_start"]), skips,
                                 t, active)
        return self.logits(hidden), eps
