"""Exact scores of one image edit on `shapes_edit` (data_pipelines/shapes_edit.py).

The detector's reading of the edited image (claims, shapes_scoring.Claim) is compared
with the edit's target scene:
  exact      every object of the target is there with all its attributes and there
             is nothing else (shapes_scoring.score_image's exact);
  edited     the edit itself is right: recolor, the object in the subject's cell has
             the new colour; move, an object of the subject's colour is in the new
             cell; resize, the subject's colour has the new size; add, the added
             object is there with all its attributes; remove, the subject's colour
             is gone;
  preserved  every other object of the scene is still there, unchanged.
An unchanged output scores edited 0 and preserved 1 on every kind; the target scene
rendered scores 1 everywhere.
"""
from __future__ import annotations

from typing import Iterable, Sequence

from data_pipelines.shapes_edit import EDIT_KINDS, Edit
from tfusion.eval.shapes_scoring import Claim, score_image

EDIT_SCORES = ("exact", "edited", "preserved")


def _holds(spec, observed: Sequence[Claim]) -> bool:
    """Some observed object has every attribute of `spec` (a ShapeSpec)."""
    want = Claim.from_spec(spec)
    return any(o.color == want.color and o.cell == want.cell and want.shapes & o.shapes
               and want.sizes & o.sizes for o in observed)


def _edited(edit: Edit, observed: Sequence[Claim]) -> bool:
    s = edit.subject
    if edit.kind == "add":
        return _holds(s, observed)
    if edit.kind == "remove":
        return not any(o.color == s.color for o in observed)
    new = next(t for t in edit.target.shapes if t not in edit.source.shapes)
    if edit.kind == "recolor":
        return any(o.cell == (s.row, s.col) and o.color == new.color for o in observed)
    if edit.kind == "move":
        return any(o.color == s.color and o.cell == (new.row, new.col) for o in observed)
    if edit.kind == "resize":
        return any(o.color == s.color and new.size in o.sizes for o in observed)
    raise ValueError(f"unknown edit kind {edit.kind!r}")


def score_edit(edit: Edit, observed: Sequence[Claim]) -> dict:
    """{score: 0 or 1} for one edited image read as `observed` claims."""
    others = [t for t in edit.target.shapes if t in edit.source.shapes]
    target = [Claim.from_spec(t) for t in edit.target.shapes]
    return {"exact": int(score_image(target, observed)["exact"][0]),
            "edited": int(_edited(edit, observed)),
            "preserved": int(all(_holds(o, observed) for o in others))}


def aggregate_edits(edits: Sequence[Edit], scores: Iterable[dict]) -> dict:
    """Mean scores over all edits and per kind: {"all": {...}, "recolor": {...}, ...}."""
    scores = list(scores)

    def mean(rows):
        out = {k: sum(r[k] for r in rows) / len(rows) if rows else float("nan")
               for k in EDIT_SCORES}
        out["edits"] = len(rows)
        return out

    result = {"all": mean(scores)}
    for kind in EDIT_KINDS:
        result[kind] = mean([s for e, s in zip(edits, scores) if e.kind == kind])
    return result
