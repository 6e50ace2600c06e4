"""The Transfusion loss: L = L_LM + lambda * L_DDPM (the diffusion term in whatever
the model predicts: tfusion.diffusion), normalised over the global batch.

Both terms are returned as (sum, count) pairs first, so gradient accumulation and
sharding only add sums and counts, then divide once: the value never depends on
how the batch was split.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def lm_target_weights(segment_ids: jax.Array, image_index: jax.Array) -> jax.Array:
    """1.0 where token i is trained to predict token i+1 (last position: never).

    Token i must be text (not pad, not patch) and token i+1 text in the same
    document: so a BOI input (next is a patch) and patches get no loss, the token
    before BOI predicts BOI, and EOI (previous is a patch) is never a target.
    """
    is_text = (segment_ids > 0) & (image_index < 0)
    nxt_text = jnp.pad(is_text[:, 1:], ((0, 0), (0, 1)))
    same_doc = jnp.pad(segment_ids[:, 1:] == segment_ids[:, :-1], ((0, 0), (0, 1)))
    return (is_text & nxt_text & same_doc).astype(jnp.float32)


def next_token_nll(logits: jax.Array, tokens: jax.Array):
    """(cross-entropy of token i+1 at every position i, log partition function)."""
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit, log_z


def lm_loss_sums(nll: jax.Array, log_z: jax.Array, weights: jax.Array,
                 z_loss_weight: float = 0.0):
    """Sum of the training NLL over weighted positions, and the count; z-loss (Chameleon's
    stabiliser) adds z_loss_weight * log Z^2 per position to keep log Z near 0."""
    if z_loss_weight:
        nll = nll + z_loss_weight * jnp.square(log_z)
    return jnp.sum(nll * weights), jnp.sum(weights)


def text_only_weights(weights: jax.Array, tokens: jax.Array, image_token_offset: int):
    """The LM targets of the discrete baseline that Transfusion also has: input and
    target both text (ids below the first VQ code). Drops image codes as targets and
    the EOI predicted from the last code, exactly the pairs Transfusion never trains."""
    is_text = tokens < image_token_offset
    nxt_text = jnp.pad(is_text[:, 1:], ((0, 0), (0, 1)))
    return weights * (is_text & nxt_text).astype(weights.dtype)


def diffusion_targets(batch) -> jax.Array:
    """bool [B, M]: slots whose image is diffused and trained (present, not a condition
    image: tfusion.batch.CONDITION)."""
    return batch["image_mask"] & (batch["image_t_max"] >= 0)


def diffusion_loss_sums(pred: jax.Array, target: jax.Array, image_mask: jax.Array,
                        weight: jax.Array | None = None):
    """Sum over target images (image_mask: diffusion_targets) of each image's (weighted) mean squared error of the model's
    output against its target (epsilon, v or x0: diffusion.target_of), and the count."""
    per_image = jnp.mean(jnp.square(pred - target), axis=(-3, -2, -1))
    if weight is not None:  # per-image loss weighting (min-SNR); the count stays unweighted
        per_image = per_image * weight
    mask = image_mask.astype(jnp.float32)
    return jnp.sum(per_image * mask), jnp.sum(mask)


def combine(sums: dict, diffusion_weight: float) -> dict:
    """Sums and counts -> the losses; empty terms (no targets / no images) are 0."""
    lm = sums["lm_sum"] / jnp.maximum(sums["lm_count"], 1.0)
    ddpm = sums["ddpm_sum"] / jnp.maximum(sums["ddpm_count"], 1.0)
    out = dict(loss=lm + diffusion_weight * ddpm, loss_lm=lm, loss_diffusion=ddpm)
    if "text_nll_sum" in sums:  # plain NLL over text pairs: comparable across families
        out["loss_text"] = sums["text_nll_sum"] / jnp.maximum(sums["text_count"], 1.0)
    if "image_token_nll_sum" in sums:  # discrete baseline: NLL of the image codes
        out["loss_image_tokens"] = (sums["image_token_nll_sum"]
                                    / jnp.maximum(sums["image_token_count"], 1.0))
    return out


def transfusion_sums(logits, image_pred, image_target, batch, z_loss_weight: float = 0.0,
                     image_token_offset: int | None = None, image_weight=None) -> dict:
    """Loss sums and counts. Besides the training sums, plain-NLL sums over text-only
    pairs (both families: combine's loss_text compares them) and, with
    `image_token_offset` (the id of VQ code 0, discrete baseline), over image codes."""
    tokens = batch["tokens"]
    weights = lm_target_weights(batch["segment_ids"], batch["image_index"])
    nll, log_z = next_token_nll(logits, tokens)
    lm_sum, lm_count = lm_loss_sums(nll, log_z, weights, z_loss_weight)
    ddpm_sum, ddpm_count = diffusion_loss_sums(image_pred, image_target,
                                               diffusion_targets(batch), image_weight)
    text = weights
    split = {}
    if image_token_offset is not None:
        text = text_only_weights(weights, tokens, image_token_offset)
        split = dict(image_token_nll_sum=jnp.sum(nll * (weights - text)),
                     image_token_count=jnp.sum(weights - text))
    split.update(text_nll_sum=jnp.sum(nll * text), text_count=jnp.sum(text))
    return dict(lm_sum=lm_sum, lm_count=lm_count, ddpm_sum=ddpm_sum, ddpm_count=ddpm_count,
                **split,
                patch_tokens=jnp.sum(batch["image_index"] >= 0).astype(jnp.float32),
                text_tokens=jnp.sum((batch["segment_ids"] > 0)
                                    & (batch["image_index"] < 0)).astype(jnp.float32))
