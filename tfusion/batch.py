"""The batch contract between the data pipeline and the model (see DESIGN.md).

One dict of numpy/jax arrays with static shapes. B rows, L = seq_len,
M = image slots per row, P = patches per image, latent H x W x C.

  tokens       int32 [B, L]   text ids; pad id at patch positions and padding
  segment_ids  int32 [B, L]   document number in the row, 1..n; 0 = padding
  positions    int32 [B, L]   position inside the document (RoPE)
  image_index  int32 [B, L]   -1 at text/pad; at a patch: slot * P + patch number
  images       f32 [B, M, H, W, C]  clean latents; zeros in empty slots
  image_mask   bool [B, M]    slot holds an image
  image_start  int32 [B, M]   sequence index of the slot's first patch
  image_t_max  int32 [B, M]   largest diffusion step allowed (noise limiting);
                              CONDITION (-1): a condition image, seen clean (t = 0
                              as the model's time input), no diffusion loss

`validate_batch` checks every invariant; `assemble_rows` is the one place that
turns documents (lists of text and image segments) into these arrays, used by the
packer and by tests alike.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence, Union

import numpy as np

# image_t_max of a condition image (editing input, image in a prompt): never noised,
# never a diffusion target, attended like any image.
CONDITION = -1

TEXT_KEYS = ("tokens", "segment_ids", "positions", "image_index")
IMAGE_KEYS = ("images", "image_mask", "image_start", "image_t_max")
BATCH_KEYS = TEXT_KEYS + IMAGE_KEYS


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """Static shapes of a batch. `max_images` = 0 means a text-only/discrete batch."""

    batch_size: int
    seq_len: int
    max_images: int
    latent_shape: tuple[int, int, int]  # H, W, C
    patch_size: int

    @property
    def patches_per_image(self) -> int:
        h, w, _ = self.latent_shape
        return (h // self.patch_size) * (w // self.patch_size)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        b, l, m = self.batch_size, self.seq_len, self.max_images
        return {
            "tokens": ((b, l), np.dtype(np.int32)),
            "segment_ids": ((b, l), np.dtype(np.int32)),
            "positions": ((b, l), np.dtype(np.int32)),
            "image_index": ((b, l), np.dtype(np.int32)),
            "images": ((b, m, *self.latent_shape), np.dtype(np.float32)),
            "image_mask": ((b, m), np.dtype(np.bool_)),
            "image_start": ((b, m), np.dtype(np.int32)),
            "image_t_max": ((b, m), np.dtype(np.int32)),
        }


def capacity_per_unit(images_per_row: float, unit_rows: int) -> int:
    """Images the modality layers run on for a unit of `unit_rows` rows at an average
    capacity of `images_per_row` (data.image_capacity_per_row): ceil of the product."""
    return math.ceil(images_per_row * unit_rows - 1e-9)


def unit_of_row(process_rows: int, devices: int, accum: int) -> list[int]:
    """For each of a process's rows, the capacity unit it belongs to: rows are split
    over the process's `devices` (consecutive blocks) and each device's rows over
    `accum` microbatches (every accum-th row: tfusion.train.step.split_microbatches)."""
    per_device = process_rows // devices
    return [(r // per_device) * accum + (r % per_device) % accum for r in range(process_rows)]


# Rank of every contract array (fixed by the contract, whatever the sizes).
BATCH_NDIMS = {k: len(shape) for k, (shape, _) in BatchSpec(1, 1, 1, (1, 1, 1), 1).shapes().items()}


class BatchContractError(ValueError):
    """A batch violates the contract; the message names the key and the rule."""


def validate_batch(batch: Mapping[str, np.ndarray], spec: BatchSpec, pad_id: int) -> None:
    """Raises BatchContractError naming the first violated rule."""
    for key, (shape, dtype) in spec.shapes().items():
        if key not in batch:
            raise BatchContractError(f"batch is missing key {key!r}")
        arr = np.asarray(batch[key])
        if arr.shape != shape:
            raise BatchContractError(f"{key}: shape {arr.shape}, expected {shape}")
        if arr.dtype != dtype:
            raise BatchContractError(f"{key}: dtype {arr.dtype}, expected {dtype}")
    b = {k: np.asarray(v) for k, v in batch.items()}
    p = spec.patches_per_image
    seg, idx, tok = b["segment_ids"], b["image_index"], b["tokens"]
    if (seg < 0).any():
        raise BatchContractError("segment_ids: negative id")
    for r in range(spec.batch_size):
        _validate_row(b, r, spec, p, pad_id)
    if ((idx >= 0) & (tok != pad_id)).any():
        raise BatchContractError("tokens: patch positions must hold the pad id")
    if ((seg == 0) & ((idx != -1) | (tok != pad_id))).any():
        raise BatchContractError("padding positions must have image_index -1 and the pad id")


def _validate_row(b, r: int, spec: BatchSpec, p: int, pad_id: int) -> None:
    seg, idx, pos = b["segment_ids"][r], b["image_index"][r], b["positions"][r]
    nonpad = np.flatnonzero(seg)
    if nonpad.size:
        ids = seg[nonpad]
        if ids[0] != 1 or (np.diff(ids) < 0).any() or (np.diff(ids) > 1).any():
            raise BatchContractError(f"segment_ids: row {r} documents must be numbered 1..n in order")
    # Positions restart at 0 for each document and count up by one.
    for d in np.unique(seg[seg > 0]):
        where = np.flatnonzero(seg == d)
        if (np.diff(where) != 1).any():
            raise BatchContractError(f"segment_ids: row {r} document {d} is not contiguous")
        if not np.array_equal(pos[where], np.arange(where.size)):
            raise BatchContractError(f"positions: row {r} document {d} must count 0..n-1")
    for m in range(spec.max_images):
        present = bool(b["image_mask"][r, m])
        at = np.flatnonzero((idx >= m * p) & (idx < (m + 1) * p))
        if not present:
            if at.size:
                raise BatchContractError(f"image_index: row {r} empty slot {m} has patches")
            if np.any(b["images"][r, m] != 0):
                raise BatchContractError(f"images: row {r} empty slot {m} must be zeros")
            continue
        start = int(b["image_start"][r, m])
        if at.size != p or not np.array_equal(at, np.arange(start, start + p)):
            raise BatchContractError(
                f"image_start/image_index: row {r} slot {m} patches are not contiguous at {start}")
        if not np.array_equal(idx[at], np.arange(m * p, (m + 1) * p)):
            raise BatchContractError(f"image_index: row {r} slot {m} patch numbers out of order")
        if len(np.unique(seg[at])) != 1 or seg[start] == 0:
            raise BatchContractError(f"segment_ids: row {r} image {m} crosses documents or padding")
        if b["image_t_max"][r, m] < CONDITION:
            raise BatchContractError(f"image_t_max: row {r} slot {m} is below {CONDITION} "
                                     "(the condition marker)")


@dataclasses.dataclass(frozen=True)
class ImageSegment:
    """One image inside a document: its clean latent and its noise limit."""

    latent: np.ndarray  # float32 [H, W, C]
    t_max: int  # CONDITION: a clean condition image without diffusion loss

    @property
    def is_condition(self) -> bool:
        return self.t_max == CONDITION


# A document is a list of segments: int token arrays (BOS/BOI/EOI/EOS included by
# whoever builds the document) and images, in sequence order.
Segment = Union[np.ndarray, ImageSegment]
Document = Sequence[Segment]


def document_length(doc: Document, patches_per_image: int) -> int:
    """Sequence positions the document occupies once packed."""
    return sum(patches_per_image if isinstance(s, ImageSegment) else len(s) for s in doc)


def document_images(doc: Document) -> int:
    return sum(isinstance(s, ImageSegment) for s in doc)


def empty_batch(spec: BatchSpec, pad_id: int) -> dict[str, np.ndarray]:
    out = {k: np.zeros(shape, dtype) for k, (shape, dtype) in spec.shapes().items()}
    out["tokens"][:] = pad_id
    out["image_index"][:] = -1
    return out


def assemble_rows(rows: Sequence[Sequence[Document]], spec: BatchSpec, pad_id: int
                  ) -> dict[str, np.ndarray]:
    """Lays out rows of documents into one contract batch (numpy).

    Raises ValueError when a row does not fit (length or image slots); deciding
    which documents share a row is the packer's job, not this function's.
    """
    if len(rows) != spec.batch_size:
        raise ValueError(f"got {len(rows)} rows for batch_size {spec.batch_size}")
    out = empty_batch(spec, pad_id)
    p = spec.patches_per_image
    for r, docs in enumerate(rows):
        cursor, slot = 0, 0
        for d, doc in enumerate(docs, start=1):
            doc_start = cursor
            for seg in doc:
                if isinstance(seg, ImageSegment):
                    if slot >= spec.max_images:
                        raise ValueError(f"row {r}: more than {spec.max_images} images")
                    if cursor + p > spec.seq_len:
                        raise ValueError(f"row {r}: documents exceed seq_len {spec.seq_len}")
                    if seg.latent.shape != spec.latent_shape:
                        raise ValueError(f"image latent shape {seg.latent.shape}, "
                                         f"expected {spec.latent_shape}")
                    span = slice(cursor, cursor + p)
                    out["image_index"][r, span] = slot * p + np.arange(p)
                    out["images"][r, slot] = seg.latent
                    out["image_mask"][r, slot] = True
                    out["image_start"][r, slot] = cursor
                    out["image_t_max"][r, slot] = seg.t_max
                    slot, n = slot + 1, p
                else:
                    n = len(seg)
                    if cursor + n > spec.seq_len:
                        raise ValueError(f"row {r}: documents exceed seq_len {spec.seq_len}")
                    out["tokens"][r, cursor:cursor + n] = seg
                    span = slice(cursor, cursor + n)
                out["segment_ids"][r, span] = d
                cursor += n
            out["positions"][r, doc_start:cursor] = np.arange(cursor - doc_start)
    return out
