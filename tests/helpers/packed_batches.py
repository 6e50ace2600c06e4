"""Random packed batches for tests, built through tfusion.batch.assemble_rows."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tfusion import attention
from tfusion.batch import BatchSpec, ImageSegment, assemble_rows, document_length
from tfusion.config import diffusion_config, model_config


def tiny_model_config(**overrides) -> ml_collections.ConfigDict:
    c = model_config()
    c.update(dict(vocab_size=64, width=32, depth=2, num_heads=4, latent_height=4,
                  latent_width=4, latent_channels=3, patch_size=2, timestep_embed_dim=16))
    c.update(overrides)
    return c


def tiny_config(**model_overrides) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(model=tiny_model_config(**model_overrides),
                                          diffusion=diffusion_config()))


def random_document(rng: np.random.Generator, cfg, max_images: int, t_max: int = 999):
    """BOS text [BOI image EOI text]* EOS-ish document with random ids >= 5."""
    vocab = cfg.vocab_size
    shape = (cfg.latent_height, cfg.latent_width, cfg.latent_channels)
    doc = [rng.integers(5, vocab, size=rng.integers(1, 5)).astype(np.int32)]
    for _ in range(rng.integers(0, max_images + 1)):
        doc.append(ImageSegment(rng.normal(size=shape).astype(np.float32),
                                int(rng.integers(0, t_max + 1))))
        doc.append(rng.integers(5, vocab, size=rng.integers(1, 4)).astype(np.int32))
    return doc


def random_rows(rng, cfg, batch_size: int, seq_len: int, max_images: int, max_docs: int = 3):
    """Rows of random documents that fit seq_len and the image slots (greedy)."""
    spec = BatchSpec(batch_size, seq_len, max_images,
                     (cfg.latent_height, cfg.latent_width, cfg.latent_channels), cfg.patch_size)
    p = spec.patches_per_image
    rows = []
    for _ in range(batch_size):
        row, used, images = [], 0, 0
        for _ in range(rng.integers(1, max_docs + 1)):
            doc = random_document(rng, cfg, max_images - images)
            n = document_length(doc, p)
            k = sum(isinstance(s, ImageSegment) for s in doc)
            if used + n <= seq_len and images + k <= max_images:
                row.append(doc)
                used, images = used + n, images + k
        rows.append(row)
    return rows, spec


def random_batch(seed: int, cfg, batch_size=2, seq_len=32, max_images=2, as_jax=True):
    rng = np.random.default_rng(seed)
    rows, spec = random_rows(rng, cfg, batch_size, seq_len, max_images)
    batch = assemble_rows(rows, spec, cfg.pad_id)
    if as_jax:
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
    return batch, rows, spec


def attention_problem(seed, seq_len, heads, kv_heads, head_dim=16, dtype=jnp.float32):
    """q, k, v [2, seq_len, heads|kv_heads, head_dim], the MaskInfo of a random packed
    batch (documents, images, padding), the real-query mask and a cotangent for q."""
    cfg = tiny_model_config()
    batch, _, spec = random_batch(seed, cfg, batch_size=2, seq_len=seq_len, max_images=3)
    info = attention.MaskInfo.from_batch(batch["segment_ids"], batch["image_index"],
                                         spec.patches_per_image)
    kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
    b = 2
    q = jax.random.normal(kq, (b, seq_len, heads, head_dim), dtype)
    k = jax.random.normal(kk, (b, seq_len, kv_heads, head_dim), dtype)
    v = jax.random.normal(kv, (b, seq_len, kv_heads, head_dim), dtype)
    real = (batch["segment_ids"] != 0)[:, :, None, None]
    cotangent = jax.random.normal(kc, q.shape, jnp.float32) * real
    assert not real.all(), "want padding in the batch"
    return q, k, v, info, real, cotangent
