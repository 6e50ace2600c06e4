"""Packer properties over random document streams (hypothesis).

Each document's token values and image latents encode (document, offset), so the
batches can be decoded back into documents without trusting the packer: every
document must come back exactly once (split text chunks reassemble) or be counted as
skipped for the reason an independent rule predicts; no image may be cut.
"""
import json

import grain
import numpy as np
from hypothesis import given, settings, strategies as st

from data_pipelines.packing import EXAMPLES_KEY, STATS_KEY, PackingIterDataset
from data_pipelines.records import DocItem
from tfusion.batch import BatchSpec, ImageSegment, validate_batch

PAD = 0
SPEC = BatchSpec(batch_size=3, seq_len=24, max_images=2, latent_shape=(2, 2, 1), patch_size=1)
P = SPEC.patches_per_image  # 4


def code(doc: int, offset: int) -> int:
    return doc * 1000 + offset + 1  # never the pad id


segment_kinds = st.one_of(st.integers(1, 30), st.just("image"))
doc_shapes = st.lists(segment_kinds, min_size=1, max_size=4)
streams = st.lists(st.one_of(doc_shapes, st.just("bad")), min_size=0, max_size=40)


def build(stream):
    """DocItems plus the expected atom sequence (code, kind) of each usable document."""
    items, expected, expected_skips = [], {}, {}
    for d, shape in enumerate(stream, start=1):
        if shape == "bad":
            items.append(DocItem.skipped("corrupt_image"))
            expected_skips["corrupt_image"] = expected_skips.get("corrupt_image", 0) + 1
            continue
        segments, atoms, offset = [], [], 0
        for kind in shape:
            if kind == "image":
                latent = np.full(SPEC.latent_shape, code(d, offset), np.float32)
                segments.append(ImageSegment(latent, t_max=d))
                atoms.append((code(d, offset), "image"))
                offset += P
            else:
                segments.append(np.array([code(d, offset + j) for j in range(kind)], np.int32))
                atoms += [(code(d, offset + j), "text") for j in range(kind)]
                offset += kind
        images = shape.count("image")
        reason = ("too_many_images" if images > SPEC.max_images else
                  "too_long_with_image" if images and offset > SPEC.seq_len else None)
        if reason:
            expected_skips[reason] = expected_skips.get(reason, 0) + 1
        else:
            expected[d] = atoms
        items.append(DocItem(document=segments))
    return items, expected, expected_skips


def decode_batches(batches):
    """doc -> list of (code, kind) atoms found in the batches, checking image integrity."""
    found = {}
    for batch in batches:
        for r in range(SPEC.batch_size):
            seg, idx, tok = batch["segment_ids"][r], batch["image_index"][r], batch["tokens"][r]
            for s in np.unique(seg[seg > 0]):
                where = np.flatnonzero(seg == s)
                docs_in_segment = set()
                for i in where:
                    if idx[i] < 0:
                        atom = (int(tok[i]), "text")
                    elif idx[i] % P == 0:
                        slot = idx[i] // P
                        latent = batch["images"][r, slot]
                        assert np.all(latent == latent.flat[0]), "image mixed with another"
                        assert batch["image_start"][r, slot] == i
                        assert np.array_equal(idx[i:i + P], np.arange(slot * P, slot * P + P))
                        assert np.all(seg[i:i + P] == s), "image cut by a segment boundary"
                        atom = (int(latent.flat[0]), "image")
                        assert batch["image_t_max"][r, slot] == atom[0] // 1000
                    else:
                        continue
                    docs_in_segment.add(atom[0] // 1000)
                    found.setdefault(atom[0] // 1000, []).append(atom)
                assert len(docs_in_segment) == 1, "a segment holds two documents"
    return found


def run(items, state_after=None):
    ds = PackingIterDataset(grain.MapDataset.source(items), SPEC, PAD, open_rows=3,
                            min_text_chunk=4)
    it = iter(ds)
    batches, counts = [], {}
    for k, batch in enumerate(it):
        for key, v in batch.pop(STATS_KEY).items():
            counts[key] = counts.get(key, 0) + v
        batch.pop(EXAMPLES_KEY, None)
        batches.append(batch)
        if state_after is not None and k == state_after:
            state = json.loads(json.dumps(it.get_state()))
            resumed = iter(ds)
            resumed.set_state(state)
            return batches, counts, list(resumed), list(it)
    return batches, counts, None, None


@settings(max_examples=150, deadline=None)
@given(streams)
def test_every_document_lands_once_or_is_counted_skipped(stream):
    items, expected, expected_skips = build(stream)
    batches, counts, _, _ = run(items)
    for batch in batches:
        validate_batch(batch, SPEC, PAD)
    found = decode_batches(batches)
    assert set(found) == set(expected)
    for d, atoms in expected.items():
        assert sorted(found[d]) == sorted(atoms), f"document {d} altered or duplicated"
    skips = {k[len("skipped/"):]: v for k, v in counts.items() if k.startswith("skipped/")}
    assert skips == expected_skips
    assert counts.get("documents", 0) == len(expected)
    used = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    assert counts.get("nonpad_tokens", 0) == used


@settings(max_examples=60, deadline=None)
@given(streams, st.integers(0, 4))
def test_restored_state_continues_exactly(stream, k):
    items, _, _ = build(stream)
    _, _, resumed, uninterrupted = run(items, state_after=k)
    if resumed is None:
        return  # the stream ended before batch k
    assert len(resumed) == len(uninterrupted)
    for a, b in zip(resumed, uninterrupted):
        a.pop(STATS_KEY), b.pop(STATS_KEY)
        assert a.pop(EXAMPLES_KEY, None) == b.pop(EXAMPLES_KEY, None)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_text_fills_rows_densely():
    # Long text documents alone must pack to 100% except the final flush.
    items = [DocItem(document=[np.arange(1, 1 + n, dtype=np.int32)]) for n in [50, 7, 33] * 20]
    batches, counts, _, _ = run(items)
    full = batches[:-1]
    assert all((b["segment_ids"] > 0).all() for b in full)
    assert counts["split_text_documents"] > 0
