"""Prompts -> one right-padded prefill block (numpy), via the batch contract's assembler.

A prompt is a document: a list of int token arrays and images (ImageSegment or a
clean latent [H, W, C]), e.g. [BOS caption BOI] or [BOS BOI] latent [EOI].
Rows are right-padded (segment id 0, dead columns): each row's prompt starts at its
cache index and the row's frontier moves past its own length only (cache.py).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from tfusion.batch import BatchSpec, ImageSegment, assemble_rows, document_images, document_length


def as_document(prompt) -> list:
    """Normalises image entries to ImageSegment (clean: t_max is unused here)."""
    out = []
    for seg in prompt:
        if isinstance(seg, ImageSegment):
            out.append(seg)
        elif np.asarray(seg).ndim == 3:
            out.append(ImageSegment(np.asarray(seg, np.float32), 0))
        else:
            out.append(np.asarray(seg, np.int32).reshape(-1))
    return out


def codes_as_tokens(doc: list, code_offset: int) -> list:
    """The discrete baseline's prompt: each image (VQ codes [h, w, 1]) becomes its
    code token ids, code_offset + code, in raster order (as the data pipeline writes)."""
    return [np.rint(s.latent).astype(np.int32).reshape(-1) + code_offset
            if isinstance(s, ImageSegment) else s for s in doc]


def image_ids(image_index: np.ndarray, columns: np.ndarray, patches_per_image: int) -> np.ndarray:
    """Image id (cache column of the image's first patch) at patches, -1 elsewhere."""
    first = columns - image_index % patches_per_image
    return np.where(image_index >= 0, first, -1).astype(np.int32)


def layout_prompts(prompts: Sequence, latent_shape, patch_size: int, pad_id: int,
                   start: int = 0) -> dict[str, np.ndarray]:
    """Right-padded block for `prompts` written at cache column `start` (an int, or
    int [R]: each row's index).

    Returns tokens, positions, segment_ids, slot, image_index [R, L] and images
    [R, M, H, W, C] (M >= 1 only when some prompt has an image), and `lengths` [R].
    """
    docs = [as_document(p) for p in prompts]
    p = BatchSpec(1, 1, 0, tuple(latent_shape), patch_size).patches_per_image
    lengths = np.asarray([document_length(d, p) for d in docs], np.int32)
    if (lengths == 0).any():
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    spec = BatchSpec(len(docs), int(lengths.max()), max(document_images(d) for d in docs),
                     tuple(latent_shape), patch_size)
    batch = assemble_rows([[d] for d in docs], spec, pad_id)
    out = {key: batch[key] for key in ("tokens", "positions", "segment_ids", "image_index")}
    columns = np.reshape(start, (-1, 1)) + np.arange(spec.seq_len)[None, :]
    out["slot"] = image_ids(out["image_index"], columns, p)
    out["images"] = batch["images"]
    out["lengths"] = lengths
    return out
