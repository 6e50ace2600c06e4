"""Model-level decoding steps: pure functions of (model, cache, arrays).

They reuse the model's own pieces (embed_tokens, encode_images, mix_inputs,
backbone via cache.extend, final_norm, logits, decode_images); `engine.Engine`
jits them. Every array has a static shape: B (or 2B with CFG) rows, and a block
of L new cache columns written at each row's own cache.index (cache.py).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from tfusion.inference import diffusion_samplers as samplers
from tfusion.inference.cache import KVCache, extend
from tfusion.inference.token_sampling import sample_tokens
from tfusion.sharding import constrain

# Purposes folded into a row's key so text and image randomness never share draws.
TEXT_STREAM, IMAGE_STREAM = 0, 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CacheColumns:
    """What L new columns hold, per row: int32 [R, L] each. Segment 0 = dead: a row
    with nothing to add (its columns are written beyond its frontier, not committed);
    a row's live columns come first (cache.KVCache.commit)."""

    positions: jax.Array
    segment_ids: jax.Array
    slot: jax.Array


def embed_prompt(model, tokens, image_index, images):
    """Token embeddings with clean (t = 0) image patches mixed in; images [B, M, H, W, C]."""
    if images is None or images.shape[1] == 0:
        x = model.embed_tokens(tokens)
        return constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    t = jnp.zeros(images.shape[:2], jnp.int32)
    patch_emb, _ = model.encode_images(images, t)
    return model.mix_inputs(tokens, image_index, patch_emb)


def prefill(model, cache: KVCache, tokens, block: CacheColumns, image_index=None, images=None):
    """Writes a (right-padded) block of text and clean images; commits its live columns.

    Returns (float32 logits [R, V] at each row's last live column, cache); a row with
    no live column gets the logits at its first (dead) column, meaningless.
    """
    x = embed_prompt(model, tokens, image_index, images)
    hidden, cache = extend(model, cache, x, block.positions, block.segment_ids, block.slot)
    last = jnp.maximum((block.segment_ids != 0).sum(axis=1) - 1, 0).astype(jnp.int32)
    hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)
    return model.logits(hidden)[:, 0], cache.commit(block.segment_ids)


def row_keys(keys, stream: int, counters):
    """Per-row key for draw number `counters[r]` of a stream: independent of batching."""
    return jax.vmap(lambda k, c: jax.random.fold_in(jax.random.fold_in(k, stream), c))(
        keys, counters)


def text_step(model, cache: KVCache, tokens, block: CacheColumns, keys, counters, banned,
              temperature, top_p, image_index=None, images=None, *, top_k: int):
    """Feeds a block of tokens [R, L] (a prompt, or one token per row) and samples
    each row's next token with the row's draw number `counters` [R].

    Returns (next tokens int32 [R], logits [R, V] at each row's last live column, cache).
    """
    logits, cache = prefill(model, cache, tokens, block, image_index, images)
    next_tokens = sample_tokens(logits, row_keys(keys, TEXT_STREAM, counters),
                                temperature=temperature, top_k=top_k, top_p=top_p,
                                banned=banned)
    return next_tokens, logits, cache


def code_step(model, cache: KVCache, logits, keys, counters, block: CacheColumns, offset,
              cfg_scale, temperature, top_p, *, top_k: int, guided: bool, codebook_size: int):
    """One VQ code of the discrete baseline's image: sample, then feed it.

    logits float32 [R, V] at each row's last column; with `guided`, rows are
    [conditional B; unconditional B] and the code is drawn from the guided logits
    (samplers.guide: exactly c at s = 1), restricted to the codebook's ids
    [offset, offset + codebook_size). Draw number `counters` [B] of each row's image
    stream. The code is written for the conditional row and its twin (block:
    segment 0 = a row outside the image phase). Returns (codes int32 [B] in [0, codebook_size), the logits
    after feeding them, cache committed).
    """
    b = keys.shape[0]
    if guided:
        logits = samplers.guide(logits[:b], logits[b:], cfg_scale)
    ids = jnp.arange(logits.shape[-1])
    outside = (ids < offset) | (ids >= offset + codebook_size)
    tokens = sample_tokens(logits, row_keys(keys, IMAGE_STREAM, counters),
                           temperature=temperature, top_k=top_k, top_p=top_p,
                           banned=jnp.broadcast_to(outside, logits.shape))
    fed = jnp.concatenate([tokens, tokens]) if guided else tokens
    next_logits, cache = prefill(model, cache, fed[:, None], block)
    return tokens - offset, next_logits, cache


def image_block(model, cache: KVCache, x_t, t, block: CacheColumns):
    """Runs P patches of latents x_t [R, H, W, C] at steps t [R] against the cache.

    Returns (final hidden [R, P, D], modality skips, cache with the block's k/v
    written at each row's cache.index, not committed).
    """
    patch_emb, skips = model.encode_images(x_t[:, None], t[:, None])
    x = constrain(patch_emb[:, 0], ("activation_batch", "activation_length", "activation_embed"))
    hidden, cache = extend(model, cache, x, block.positions, block.segment_ids, block.slot)
    return hidden, skips, cache


def predict(model, cache: KVCache, x_t, t, block: CacheColumns):
    """The model's image output float32 [R, H, W, C] (eps, v or x0, as trained) at model
    times t [R] (cache columns overwritten)."""
    hidden, skips, cache = image_block(model, cache, x_t, t, block)
    return model.decode_images(hidden[:, None], skips, t[:, None])[:, 0], cache


def initial_noise(keys, image_counters, shape):
    """x_T per row from the row's image stream: [B, *shape]."""
    keys = row_keys(keys, IMAGE_STREAM, image_counters)
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def guided_denoise(model, cache, x, level, block: CacheColumns, cfg_scale, *,
                   guided: bool, prediction: str, process: str, clip):
    """(x0, eps) of x [B, H, W, C] at one level = (model time, a, s); with `guided`,
    rows are [conditional B; unconditional B] sharing x and the guided output is
    converted."""
    model_time, a, s = level
    b = x.shape[0]
    rows_x = jnp.concatenate([x, x]) if guided else x
    t = jnp.full((rows_x.shape[0],), model_time, jnp.float32)
    pred, cache = predict(model, cache, rows_x, t, block)
    if guided:
        pred = samplers.guide(pred[:b], pred[b:], cfg_scale)
    return samplers.denoised(pred, x, a, s, prediction, process, clip), cache


def diffusion_step(model, cache: KVCache, state: samplers.SamplerState, i, keys,
                   image_counters, block: CacheColumns, schedule: samplers.Schedule,
                   cfg_scale, *, sampler: str, guided: bool, prediction: str = "eps",
                   process: str = "ddpm", clip: float | None = None):
    """Sampling step i: state at level i -> state at level i - 1 (x [B, H, W, C] and
    this step's x0 estimate, which the multistep solver uses next step).

    Returns (state, cache); the cache's image columns hold this step's k/v and are
    overwritten by the next step. Heun calls the model a second time at the Euler
    point (except on the last step, i = 0, which ends at t = 0).
    """
    denoise = functools.partial(guided_denoise, model, block=block, cfg_scale=cfg_scale,
                                guided=guided, prediction=prediction, process=process,
                                clip=clip)
    x = state.x
    level = (schedule.model_time[i], schedule.signal[i], schedule.noise[i])
    (x0, eps), cache = denoise(cache, x, level)
    step_keys = row_keys(keys, IMAGE_STREAM, image_counters)
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:]))(step_keys)
    x_prev = samplers.sampler_step(sampler, schedule, i, x, x0, eps, noise, state.x0_last)
    if sampler != "heun":
        return samplers.SamplerState(x_prev, x0), cache

    def corrected(cache):
        level_prev = (schedule.model_time_prev[i], schedule.signal_prev[i],
                      schedule.noise_prev[i])
        (x0_e, eps_e), cache = denoise(cache, x_prev, level_prev)
        return samplers.heun_correction(x, eps - x0, eps_e - x0_e, schedule, i), cache

    x_prev, cache = jax.lax.cond(i > 0, corrected, lambda cache: (x_prev, cache), cache)
    return samplers.SamplerState(x_prev, x0), cache


def diffusion_steps(model, cache: KVCache, state: samplers.SamplerState, first, count, keys,
                    image_counters, block: CacheColumns, schedule: samplers.Schedule,
                    cfg_scale, *, guided: bool, skip_twin: bool = False, **step_options):
    """Sampling steps first, first - 1, ..., first - count + 1 as one program.

    A `lax.fori_loop` over diffusion_step: one dispatch for the whole chunk instead of
    one per step, with the cache carried (and updated in place) through the loop.
    `first` and `count` are traced, so every chunk length reuses one compilation;
    the caller reports progress between chunks. Returns (state, cache) like one step.

    skip_twin (static; a guided cache, steps outside the guidance interval): the
    conditional rows run alone, unguided, on a copy of the cache's first B rows taken
    once for the chunk; the unconditional twin is not computed. The input cache is
    returned: image columns are rewritten by every step and committed by
    commit_image, so no later step reads these steps' columns.
    """
    def run(cache, block, guided):
        def body(j, carry):
            state, cache = carry
            return diffusion_step(model, cache, state, first - j, keys, image_counters, block,
                                  schedule, cfg_scale, guided=guided, **step_options)
        return jax.lax.fori_loop(0, count, body, (state, cache))

    if not skip_twin:
        return run(cache, block, guided)
    b = state.x.shape[0]
    rows = CacheColumns(*(c[:b] for c in (block.positions, block.segment_ids, block.slot)))
    state, _ = run(cache.first_rows(b), rows, False)
    return state, cache


def commit_image(model, cache: KVCache, x0, block: CacheColumns):
    """Writes the finished image (t = 0, like a prompt image) into the cache; commits it."""
    t = jnp.zeros((x0.shape[0],), jnp.int32)
    _, _, cache = image_block(model, cache, x0, t, block)
    return cache.commit(block.segment_ids)
