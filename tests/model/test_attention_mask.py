"""attention_mask and key_ranges against a brute-force double loop over positions."""
import numpy as np
import pytest

from tests.helpers.packed_batches import random_batch, tiny_model_config
from tfusion.attention import attention_mask, key_ranges


def brute_force_mask(segment_ids, image_index, p):
    b, l = segment_ids.shape
    out = np.zeros((b, l, l), bool)
    for r in range(b):
        for i in range(l):
            for j in range(l):
                si, sj = segment_ids[r, i], segment_ids[r, j]
                if si == 0 or si != sj:
                    continue
                ii, ij = image_index[r, i], image_index[r, j]
                same_image = ii >= 0 and ij >= 0 and ii // p == ij // p
                out[r, i, j] = j <= i or same_image
    return out


@pytest.mark.parametrize("seed", range(6))
def test_mask_matches_brute_force(seed):
    cfg = tiny_model_config()
    batch, rows, spec = random_batch(seed, cfg, batch_size=3, seq_len=40, max_images=3,
                                     as_jax=False)
    assert batch["image_mask"].sum() >= 1 and (batch["segment_ids"] == 0).any()
    want = brute_force_mask(batch["segment_ids"], batch["image_index"], spec.patches_per_image)
    got = np.asarray(attention_mask(batch["segment_ids"], batch["image_index"],
                                    spec.patches_per_image))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("seed", range(4))
def test_key_ranges_describe_the_mask(seed):
    cfg = tiny_model_config()
    batch, _, spec = random_batch(seed, cfg, batch_size=3, seq_len=40, max_images=3,
                                  as_jax=False)
    mask = brute_force_mask(batch["segment_ids"], batch["image_index"], spec.patches_per_image)
    k_start, k_end = key_ranges(batch["segment_ids"], batch["image_index"],
                                spec.patches_per_image)
    j = np.arange(mask.shape[-1])
    from_ranges = (j >= k_start[..., None]) & (j < k_end[..., None])
    np.testing.assert_array_equal(from_ranges, mask)
