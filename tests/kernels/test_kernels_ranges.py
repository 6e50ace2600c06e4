"""Key ranges (jnp) and per-block ranges against the dense reference mask."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers.packed_batches import random_batch, tiny_model_config
from tfusion.attention import MaskInfo, key_ranges_from_info, mask_from_info
from tfusion.kernels.block_ranges import BlockRanges, pad_ranges, visited_fraction


def _info(seed, seq_len=40, bidirectional=True):
    cfg = tiny_model_config()
    batch, _, spec = random_batch(seed, cfg, batch_size=3, seq_len=seq_len, max_images=3)
    return MaskInfo.from_batch(batch["segment_ids"], batch["image_index"],
                               spec.patches_per_image, bidirectional)


def _mask_from_ranges(k_start, k_end, lk):
    j = jnp.arange(lk)
    return (j >= k_start[..., None]) & (j < k_end[..., None])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bidirectional", [True, False])
def test_ranges_describe_the_mask_under_jit(seed, bidirectional):
    info = _info(seed, bidirectional=bidirectional)
    k_start, k_end = jax.jit(key_ranges_from_info)(info)
    np.testing.assert_array_equal(_mask_from_ranges(k_start, k_end, 40), mask_from_info(info))


@pytest.mark.parametrize("seed", range(3))
def test_ranges_for_a_slice_of_queries(seed):
    """Decoding: queries are a window of positions, keys the whole (cached) row."""
    full = _info(seed)
    window = slice(17, 29)
    info = MaskInfo(full.q_segment_ids[:, window], full.q_slot[:, window],
                    full.q_index[:, window], full.kv_segment_ids, full.kv_slot,
                    full.kv_index)
    k_start, k_end = key_ranges_from_info(info)
    np.testing.assert_array_equal(_mask_from_ranges(k_start, k_end, 40), mask_from_info(info))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("block_q,block_k", [(8, 8), (16, 8), (8, 16)])
def test_block_ranges_cover_every_allowed_tile(seed, block_q, block_k):
    info = _info(seed, seq_len=48)
    mask = np.asarray(mask_from_info(info))
    b, lq, lk = mask.shape
    k_start, k_end = pad_ranges(*key_ranges_from_info(info), block_q)
    r = BlockRanges.build(k_start, k_end, block_q, block_k, lk // block_k)
    tiles = mask.reshape(b, lq // block_q, block_q, lk // block_k, block_k).any(axis=(2, 4))
    nq, nk = tiles.shape[1:]
    kv_visit = (np.arange(nk) >= np.asarray(r.kv_lo)[..., None]) & (
        np.arange(nk) < np.asarray(r.kv_hi)[..., None])
    q_visit = (np.arange(nq) >= np.asarray(r.q_lo)[..., None]) & (
        np.arange(nq) < np.asarray(r.q_hi)[..., None])
    assert not (tiles & ~kv_visit).any(), "an allowed tile is skipped (forward, dq)"
    assert not (tiles & ~q_visit.transpose(0, 2, 1)).any(), "skipped in the dk/dv walk"
    np.testing.assert_array_equal(kv_visit, q_visit.transpose(0, 2, 1))
    # Only tiles between a query block's first and last allowed tile are visited.
    first = np.where(tiles.any(-1), tiles.argmax(-1), 0)
    last = np.where(tiles.any(-1), nk - tiles[..., ::-1].argmax(-1), 0)
    np.testing.assert_array_equal(r.kv_lo, first)
    np.testing.assert_array_equal(r.kv_hi, last)
    assert 0 < float(visited_fraction(*key_ranges_from_info(info), lk, block_q, block_k)) < 1
