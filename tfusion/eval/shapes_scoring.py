"""Attribute-level scores for `shapes` (in the spirit of GenEval).

One comparison serves both directions:
  * generation: the prompt's shapes (what was asked) vs. the detector's findings
    on the generated image;
  * captioning: the real image's ground-truth shapes vs. what the generated
    caption claims (parsed with the dataset's vocabulary).

Each stated shape is matched by colour (colours are unique within a scene, so
colour is the object's identity; among several same-coloured candidates the one
in the stated cell is preferred). Then per stated shape:
  color     a matching object exists,
  position  it is in the stated grid cell,
  shape     its shape is the stated one (any of the detector's pixel-identical
            candidates counts, see shapes_detector.py),
  size      its size is the stated one;
and per image: count (as many objects as stated) and exact (everything right).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Optional, Sequence

from data_pipelines import shapes

ATTRIBUTES = ("color", "shape", "size", "position")
IMAGE_SCORES = ("count", "exact")


@dataclasses.dataclass(frozen=True)
class Claim:
    """What an image or a caption says about one object; empty sets = not stated."""
    color: Optional[str]
    shapes: frozenset
    sizes: frozenset
    cell: Optional[tuple[int, int]]

    @classmethod
    def from_spec(cls, spec) -> "Claim":
        """From a ShapeSpec or its attributes() dict (ground truth, prompts)."""
        get = spec.get if isinstance(spec, dict) else lambda k: getattr(spec, k)
        return cls(get("color"), frozenset([get("shape")]), frozenset([get("size")]),
                   (int(get("row")), int(get("col"))))

    @classmethod
    def from_detection(cls, det) -> "Claim":
        return cls(det.color, det.shapes, det.sizes, (det.row, det.col))


# Position phrase -> (row, col), from the dataset's own naming rule.
_CELLS = {shapes.cell_name(r, c): (r, c) for r in range(3) for c in range(3)}


def normalize_text(text: str) -> str:
    """Lowercase, punctuation -> spaces, single spaces (also CIDEr's tokenization)."""
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())


def parse_caption(text: str) -> list[Claim]:
    """A shapes caption ('a small red circle at the top left and ...') -> claims.

    Tolerant: unknown words are ignored and a missing attribute stays unstated, so
    a half-right caption earns partial credit instead of failing to parse.
    """
    claims = []
    for phrase in normalize_text(text).split(" and "):
        words = phrase.split()
        if not words:
            continue
        position = phrase.split(" at the ", 1)[1] if " at the " in phrase else ""
        claim = Claim(
            color=next((w for w in words if w in shapes.COLORS), None),
            shapes=frozenset(w for w in words if w in shapes.SHAPES),
            sizes=frozenset(w for w in words if w in shapes.SIZES),
            cell=_CELLS.get(position.strip()),
        )
        if claim.color or claim.shapes or claim.sizes or claim.cell:
            claims.append(claim)
    return claims


def _match(stated: Claim, observed: Sequence[Claim]) -> Optional[Claim]:
    same_color = [o for o in observed if o.color == stated.color]
    in_cell = [o for o in same_color if o.cell == stated.cell]
    return (in_cell or same_color or [None])[0]


def score_image(stated: Sequence[Claim], observed: Sequence[Claim]) -> dict:
    """Correct counts for one image: {attr: (correct, total)} for ATTRIBUTES (per
    stated object) and IMAGE_SCORES (one per image)."""
    correct = dict.fromkeys(ATTRIBUTES, 0)
    for claim in stated:
        match = _match(claim, observed)
        if match is None:
            continue
        correct["color"] += 1
        correct["position"] += int(match.cell == claim.cell)
        correct["shape"] += int(bool(claim.shapes & match.shapes))
        correct["size"] += int(bool(claim.sizes & match.sizes))
    n = len(stated)
    out = {a: (correct[a], n) for a in ATTRIBUTES}
    count_ok = int(len(observed) == n)
    out["count"] = (count_ok, 1)
    out["exact"] = (int(count_ok and all(correct[a] == n for a in ATTRIBUTES)), 1)
    return out


def aggregate(per_image: Iterable[dict], by_count: Optional[Sequence[int]] = None) -> dict:
    """Accuracies over images; with by_count (number of stated shapes per image)
    also per scene size, e.g. {"1_shapes": {...}, "3_shapes": {...}}."""
    per_image = list(per_image)

    def accuracies(rows):
        out = {}
        for key in ATTRIBUTES + IMAGE_SCORES:
            total = sum(r[key][1] for r in rows)
            out[key] = sum(r[key][0] for r in rows) / total if total else float("nan")
        out["images"] = len(rows)
        return out

    result = accuracies(per_image)
    if by_count is not None:
        for n in sorted(set(by_count)):
            rows = [r for r, c in zip(per_image, by_count) if c == n]
            result[f"{n}_shapes"] = accuracies(rows)
    return result
