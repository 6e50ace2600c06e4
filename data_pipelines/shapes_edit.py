"""The built-in `shapes_edit` set: a shapes scene, one instruction, the exact edited scene.

Five kinds of edit, each naming its object by colour and shape (colours are unique in
a scene, so "the red circle" is one object) and cells as the captions name them:

  recolor  make the red circle blue            (a colour no other object has)
  move     move the red circle to the top left (an empty cell)
  resize   make the red circle small           (the other size)
  add      add a small green triangle at the bottom   (an unused colour, an empty cell)
  remove   remove the red circle               (scenes of 2+ objects)

Every edit is a pure function of (split, index): the kind cycles with the index, the
scene and the edit are drawn from a seeded generator. Held out: instructions whose
CRC-32 is 0 mod HELDOUT_MODULUS (about one in five of every kind, a fixed set) are
never drawn for training; the eval split draws only those, on scenes of another
seed, so every evaluated (scene, instruction) combination is new to the model.
"""
from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from data_pipelines.shapes import COLORS, SHAPES, SIZES, Scene, ShapeSpec, cell_name

EDIT_KINDS = ("recolor", "move", "resize", "add", "remove")
EDIT_SEEDS = {"train": 10, "eval": 11}
HELDOUT_MODULUS = 5


@dataclasses.dataclass(frozen=True)
class Edit:
    kind: str
    instruction: str
    source: Scene  # the input image's scene
    target: Scene  # the scene the edited image must show
    subject: ShapeSpec  # the object edited, removed or added (as in the target for add)


def is_heldout(instruction: str) -> bool:
    """Instructions kept for evaluation only (a fixed ~1/5 of every kind)."""
    return zlib.crc32(instruction.encode()) % HELDOUT_MODULUS == 0


def _name(spec: ShapeSpec) -> str:
    return f"the {spec.color} {spec.shape}"


def _random_scene(rng: np.random.Generator, count: int) -> list[ShapeSpec]:
    cells = sorted(rng.choice(9, size=count, replace=False).tolist())
    colors = rng.choice(len(COLORS), size=count, replace=False)
    names = list(COLORS)
    return [ShapeSpec(shape=SHAPES[int(rng.integers(len(SHAPES)))], color=names[int(c)],
                      size=tuple(SIZES)[int(rng.integers(len(SIZES)))],
                      row=cell // 3, col=cell % 3)
            for cell, c in zip(cells, colors)]


def _scene(specs) -> Scene:
    """Objects in grid-cell order, as make_scene writes them (captions follow it)."""
    return Scene(tuple(sorted(specs, key=lambda s: (s.row, s.col))))


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def draw_edit(kind: str, rng: np.random.Generator, max_shapes: int) -> Edit:
    """One edit of `kind` on a fresh scene of 1..max_shapes objects (remove: 2.., add:
    ..max_shapes - 1, so the target also has 1..max_shapes)."""
    lo = 2 if kind == "remove" else 1
    hi = max_shapes - 1 if kind == "add" else max_shapes
    specs = _random_scene(rng, int(rng.integers(lo, hi + 1)))
    free_cells = [c for c in range(9) if c not in {s.row * 3 + s.col for s in specs}]
    free_colors = [c for c in COLORS if c not in {s.color for s in specs}]
    if kind == "add":
        cell = _pick(rng, free_cells)
        subject = ShapeSpec(shape=_pick(rng, SHAPES), color=_pick(rng, free_colors),
                            size=_pick(rng, tuple(SIZES)), row=cell // 3, col=cell % 3)
        instruction = (f"add a {subject.size} {subject.color} {subject.shape} at the "
                       f"{cell_name(subject.row, subject.col)}")
        return Edit(kind, instruction, _scene(specs), _scene(specs + [subject]), subject)
    subject = _pick(rng, specs)
    others = [s for s in specs if s is not subject]
    if kind == "remove":
        return Edit(kind, f"remove {_name(subject)}", _scene(specs), _scene(others), subject)
    if kind == "recolor":
        edited = dataclasses.replace(subject, color=_pick(rng, free_colors))
        instruction = f"make {_name(subject)} {edited.color}"
    elif kind == "move":
        cell = _pick(rng, free_cells)
        edited = dataclasses.replace(subject, row=cell // 3, col=cell % 3)
        instruction = f"move {_name(subject)} to the {cell_name(edited.row, edited.col)}"
    elif kind == "resize":
        edited = dataclasses.replace(subject, size="small" if subject.size == "large" else "large")
        instruction = f"make {_name(subject)} {edited.size}"
    else:
        raise ValueError(f"unknown edit kind {kind!r}; choose from {EDIT_KINDS}")
    return Edit(kind, instruction, _scene(specs), _scene(others + [edited]), subject)


def make_edit(split: str, index: int, max_shapes: int = 3) -> Edit:
    """Edit `index` of a split: kind EDIT_KINDS[index % 5]; train draws only
    instructions that are not held out, eval only held-out ones."""
    if split not in EDIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; choose from {tuple(EDIT_SEEDS)}")
    if max_shapes < 2:
        raise ValueError(f"edits need scenes of up to >= 2 objects, got max_shapes={max_shapes}")
    kind = EDIT_KINDS[index % len(EDIT_KINDS)]
    rng = np.random.default_rng([EDIT_SEEDS[split], index, 0xED17])
    while True:
        edit = draw_edit(kind, rng, max_shapes)
        if is_heldout(edit.instruction) == (split == "eval"):
            return edit
