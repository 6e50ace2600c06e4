"""Flash kernels on KV-cache shapes (issue 30): queries are the new columns, keys the
whole cache, against the dense reference with the same MaskInfo."""
import jax.numpy as jnp
import numpy as np
import pytest

from tfusion import attention
from tfusion.kernels.flash import FlashSettings, flash_attention


def _qkv(seed, b, lq, lk, heads=2, kv_heads=1, dh=16):
    rng = np.random.default_rng(seed)
    draw = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    return draw(b, lq, heads, dh), draw(b, lk, kv_heads, dh), draw(b, lk, kv_heads, dh)


def _cache_info(segments, slots, q_columns):
    """MaskInfo of a decoding call: kv ids are the whole cache row (kv_index[j] == j),
    q ids are the cache's ids at the queries' columns."""
    seg = jnp.asarray(segments, jnp.int32)
    slot = jnp.asarray(slots, jnp.int32)
    cols = jnp.asarray(q_columns, jnp.int32)
    kv_index = jnp.broadcast_to(jnp.arange(seg.shape[1], dtype=jnp.int32), seg.shape)
    take = lambda a: jnp.take_along_axis(a, cols, axis=1)
    return attention.MaskInfo(take(seg), take(slot), cols, seg, slot, kv_index)


def _check(info, q, k, v, settings):
    want = attention.xla_attention(q, k, v, info)
    got = flash_attention(q, k, v, info, settings=settings)
    real = np.asarray(info.q_segment_ids != 0)[:, :, None, None]
    np.testing.assert_allclose(np.asarray(got) * real, np.asarray(want) * real, atol=2e-5)


SETTINGS = [FlashSettings("gpu", 16, 16, interpret=True),
            FlashSettings("tpu", 8, 8, interpret=True)]


@pytest.mark.parametrize("settings", SETTINGS, ids=["gpu", "tpu"])
def test_a_gap_inside_a_document_is_a_range_the_kernels_cannot_express(settings):
    """The issue's repro: placeholder columns (segment 0) inside a row's prefix split
    its document in two; the reference keeps the caption (keys 0-2), one contiguous
    key range per query cannot. The cache therefore never leaves such gaps (each row
    writes at its own index), and the ranges say so: key_ranges_from_info reports the
    document's last run, which is what the kernels compute."""
    seg = [[1, 1, 1, 0, 0, 1, 1, 1, 1]]
    slot = [[-1, -1, -1, -1, -1, 5, 5, 5, 5]]
    info = _cache_info(seg, slot, [[5, 6, 7, 8]])
    allowed = np.asarray(attention.mask_from_info(info))[0]
    assert allowed[:, [0, 1, 2, 5, 6, 7, 8]].all() and not allowed[:, 3:5].any()
    k_start, k_end = attention.key_ranges_from_info(info)
    assert np.asarray(k_start).tolist() == [[5] * 4] and np.asarray(k_end).tolist() == [[9] * 4]
    # The same sequence as the cache now lays it out (the dead columns past the
    # frontier): the kernel equals the reference, caption included.
    info = _cache_info([[1, 1, 1, 1, 1, 1, 1, 0, 0]], [[-1, -1, -1, 3, 3, 3, 3, -1, -1]],
                       [[3, 4, 5, 6]])
    q, k, v = _qkv(2, 1, 4, 9)
    _check(info, q, k, v, settings)


@pytest.mark.parametrize("settings", SETTINGS, ids=["gpu", "tpu"])
def test_cache_layout_decode_shapes_match_reference(settings):
    """What the cache holds now, per row: its documents contiguous from column 0, dead
    (segment 0) columns only beyond its frontier. Lq != Lk, Lq below one block, and
    rows whose frontiers differ (one row writes nothing: segment 0)."""
    s = 12  # cache columns
    #      caption      image (slot 3)  EOI text | dead / beyond frontier
    row0 = ([1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], [-1, -1, -1, 3, 3, 3, 3, -1, -1, -1, -1, -1])
    # CFG twin: BOS BOI image (slot 2) as document 1, then a new document BOS BOI image
    row1 = ([1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0, 0], [-1, -1, 2, 2, -1, -1, 6, 6, 6, 6, -1, -1])
    # nothing written this call: the queries are dead columns at the frontier
    row2 = ([1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], [-1] * s)
    seg = [row0[0], row1[0], row2[0]]
    slot = [row0[1], row1[1], row2[1]]
    q_cols = [[5, 6, 7, 8], [6, 7, 8, 9], [3, 4, 5, 6]]  # four new columns per row
    q, k, v = _qkv(0, 3, 4, s)
    _check(_cache_info(seg, slot, q_cols), q, k, v, settings)
    # One new column (a text step), keys the whole cache.
    q1, _, _ = _qkv(1, 3, 1, s)
    _check(_cache_info(seg, slot, [[8], [9], [3]]), q1, k, v, settings)
