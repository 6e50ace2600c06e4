"""Block sparsity of the Transfusion mask on packed batches: what the kernels skip.

  PYTHONPATH=. /work/venv/bin/python benchmarks/block_sparsity.py [--rows 64]

Synthetic packing (paper-like): documents of 500-3000 tokens holding 1-2 images
of 256 patches, greedily packed into rows of 4096 with tfusion.batch.assemble_rows.
Also, where the data pipeline runs, its batches for the shapes_tiny experiment.
For each tile size it reports the fraction of tiles the range-driven kernel
skips, the fraction that is truly all-masked (the ideal), and what a plain
causal kernel would skip. Writes benchmarks/results/block_sparsity.json.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from tfusion.attention import key_ranges
from tfusion.batch import BatchSpec, ImageSegment, assemble_rows, document_length
from tfusion.kernels.block_ranges import visited_fraction

LATENT = (32, 32, 8)  # 256 px through an f8c8 VAE; 2x2 patches -> 256 per image
PATCH = 2
TILES = ((128, 128), (64, 64), (256, 256))


def synthetic_document(rng: np.random.Generator, patches: int) -> list:
    """500-3000 positions: text, then 1-2 images (BOI/EOI included) among text."""
    length = int(rng.integers(500, 3001))
    images = int(rng.integers(1, 3))
    text = length - images * (patches + 2)
    cuts = np.sort(rng.integers(1, text, size=images))
    pieces = np.split(np.arange(text, dtype=np.int32) % 1000 + 5, cuts)
    latent = np.zeros(LATENT, np.float32)
    doc = [pieces[0]]
    for piece in pieces[1:]:
        doc += [np.array([3], np.int32), ImageSegment(latent, 999),
                np.concatenate([np.array([4], np.int32), piece])]
    return doc


def synthetic_batch(rng: np.random.Generator, rows: int, seq_len: int, patches: int,
                    fill_with_text: bool = True) -> dict:
    """Greedy packing: a row takes documents until the next one does not fit; with
    fill_with_text the rest of the row is a chunk of a long text-only document
    (DESIGN.md: those are cut into chunks), else padding."""
    spec = BatchSpec(rows, seq_len, seq_len // patches, LATENT, PATCH)
    packed, row, used = [], [], 0
    pending = synthetic_document(rng, patches)
    while len(packed) < rows:
        n = document_length(pending, patches)
        if used + n <= seq_len:
            row.append(pending)
            used += n
            pending = synthetic_document(rng, patches)
        else:
            if fill_with_text and used < seq_len:
                row.append([np.full(seq_len - used, 7, np.int32)])
            packed.append(row)
            row, used = [], 0
    return assemble_rows(packed, spec, pad_id=0)


def tile_stats(segment_ids, image_index, patches: int, block_q: int, block_k: int) -> dict:
    b, l = segment_ids.shape
    k_start, k_end = key_ranges(segment_ids, image_index, patches)
    nq, nk = l // block_q, l // block_k
    # A tile is live if any of its rows' ranges overlaps its columns.
    live = np.zeros((b, nq, nk), bool)
    first, last = k_start // block_k, -(-k_end // block_k)
    for c in range(nk):
        hit = (first <= c) & (c < last) & (k_end > k_start)
        live[:, :, c] = hit.reshape(b, nq, block_q).any(-1)
    causal_tiles = sum(min(nk, -(-(r + 1) * block_q // block_k)) for r in range(nq))
    return dict(
        block_q=block_q, block_k=block_k,
        skipped_by_kernel=round(1 - float(visited_fraction(k_start, k_end, l, block_q,
                                                            block_k)), 4),
        skipped_ideal=round(1 - float(live.mean()), 4),
        skipped_by_causal_kernel=round(1 - causal_tiles / (nq * nk), 4))


def describe(batch: dict, patches: int) -> dict:
    seg, idx = batch["segment_ids"], batch["image_index"]
    k_start, k_end = key_ranges(seg, idx, patches)
    l = seg.shape[1]
    return dict(rows=int(seg.shape[0]), seq_len=int(l), patches_per_image=patches,
                documents_per_row=float(np.mean(seg.max(axis=1))),
                images_per_row=float(np.mean(batch["image_mask"].sum(axis=1))),
                non_pad_fraction=round(float((seg > 0).mean()), 4),
                attended_pair_fraction=round(float((k_end - k_start).sum() / (seg.shape[0] * l * l)), 4),
                tiles=[tile_stats(seg, idx, patches, bq, bk) for bq, bk in TILES
                       if l % bq == 0 and l % bk == 0])


def pipeline_batches(name: str, count: int):
    """Batches from data_pipelines for a registry experiment (None if unavailable)."""
    try:
        from data_pipelines import make_train_iterator
        from experiments.registry import get_config
        config = get_config(name)
        it = make_train_iterator(config)
        batches = [next(it) for _ in range(count)]
    except Exception as e:  # the pipeline is being written concurrently
        return None, f"{type(e).__name__}: {e}"
    m = config.model
    patches = (m.latent_height // m.patch_size) * (m.latent_width // m.patch_size)
    merged = {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in
              ("segment_ids", "image_index", "image_mask")}
    return describe(merged, patches), None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/block_sparsity.json")
    args = parser.parse_args()
    patches = (LATENT[0] // PATCH) * (LATENT[1] // PATCH)
    result = dict(command="python " + " ".join(sys.argv))
    packing = "docs of 500-3000 positions, 1-2 images of 256 patches each, greedy rows of 4096"
    for name, fill in (("synthetic", True), ("synthetic_padded", False)):
        batch = synthetic_batch(np.random.default_rng(args.seed), args.rows, 4096, patches,
                                fill_with_text=fill)
        result[name] = dict(describe(batch, patches), packing=packing + (
            ", the rest filled by a text-only chunk" if fill else ", the rest padding"))
    tiny, error = pipeline_batches("shapes_tiny", 4)
    result["pipeline_shapes_tiny"] = tiny if tiny is not None else dict(unavailable=error)
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
