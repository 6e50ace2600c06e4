"""Mixing the text-only and image-caption document streams by token share.

`text_token_share` is the fraction of packed positions that should come from
text-only documents (paper: 1:1 text : image tokens, i.e. 0.5; an image document's
positions - caption, markers and patches - all count as image-stream tokens).
grain's mix picks documents, not tokens, so each stream's sampling weight is its
share divided by its mean document length, measured on the stream's first
`probe_docs` documents (a deterministic probe; skipped documents are ignored).
"""
from __future__ import annotations

from typing import Optional

import grain

from tfusion.batch import document_length


def mean_document_length(stream: grain.MapDataset, probe_docs: int, patches: int) -> float:
    lengths = []
    for i in range(probe_docs):
        doc = stream[i].document
        if doc is not None:
            lengths.append(document_length(doc, patches))
    # A stream whose probe is all bad records still mixes (its records get counted
    # as skipped downstream); length 1 is a neutral placeholder.
    return sum(lengths) / len(lengths) if lengths else 1.0


def mix_streams(images: Optional[grain.MapDataset], texts: Optional[grain.MapDataset],
                text_token_share: float, probe_docs: int, patches: int
                ) -> tuple[grain.MapDataset, dict]:
    """Returns (mixed document stream, {'image': p, 'text': p} document probabilities)."""
    if texts is None or text_token_share == 0.0:
        if images is None:
            raise ValueError("no document stream: both image and text sources are off")
        return images, {"image": 1.0, "text": 0.0}
    if images is None or text_token_share == 1.0:
        return texts, {"image": 0.0, "text": 1.0}
    image_weight = (1.0 - text_token_share) / mean_document_length(images, probe_docs, patches)
    text_weight = text_token_share / mean_document_length(texts, probe_docs, patches)
    total = image_weight + text_weight
    weights = {"image": image_weight / total, "text": text_weight / total}
    return grain.MapDataset.mix([images, texts], [weights["image"], weights["text"]]), weights
