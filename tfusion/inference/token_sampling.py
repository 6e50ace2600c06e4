"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus), per-row keys."""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def filter_top_k(logits, k: int):
    """Keeps the k largest logits per row (k static; 0 = off)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def filter_top_p(logits, p):
    """Keeps the smallest set of tokens whose probability reaches p (p traced; 1 = off).

    The most likely token is always kept, so p -> 0 degenerates to greedy.
    """
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < p
    # The threshold is the smallest kept logit; ties at it are kept too.
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, NEG_INF, logits)


def sample_tokens(logits, keys, *, temperature, top_k: int = 0, top_p=1.0, banned=None):
    """logits float32 [B, V], keys [B] -> int32 [B].

    temperature 0 is greedy (argmax). `banned` bool [B, V'] marks ids never produced
    (e.g. pad, EOI, or BOI once a row may not start another image). V' may be less than
    V: the model's logits cover model.padded_vocab_size ids, a caller's mask the real
    vocab_size; ids past the mask (the padding) are banned too.
    """
    if banned is not None:
        extra = logits.shape[-1] - banned.shape[-1]
        if extra < 0:
            raise ValueError(f"banned mask covers {banned.shape[-1]} ids, logits only "
                             f"{logits.shape[-1]}")
        if extra:
            banned = jnp.pad(banned, [(0, 0)] * (banned.ndim - 1) + [(0, extra)],
                             constant_values=True)
        logits = jnp.where(banned, NEG_INF, logits)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    scaled = filter_top_p(filter_top_k(scaled, top_k), top_p)
    sampled = jax.vmap(jax.random.categorical)(keys, scaled)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)
