"""The built-in `shapes` image-caption set: procedural scenes, exact ground truth.

A scene is 1..N shapes on a black background, each in its own cell of a 3x3 grid,
with a distinct saturated colour and a size (small/large). Every attribute is chosen
so an analytic detector can recover it from pixels: colours are corners of the RGB
cube (one colour per shape, so colour identifies the shape), cells do not overlap,
and the two sizes differ by ~2x in area. Scenes are a pure function of (seed, index)
and render at any resolution (>= 12 px keeps small shapes several pixels wide).
"""
from __future__ import annotations

import dataclasses

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
# Side (square, triangle) or diameter (circle) as a fraction of the grid cell.
SIZES = {"small": 0.5, "large": 0.9}
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")


def cell_name(row: int, col: int) -> str:
    """'top left', 'top', 'center', 'bottom right', ... (3x3 grid cells)."""
    if row == 1 and col == 1:
        return "center"
    parts = [ROWS[row] if row != 1 else "", COLS[col] if col != 1 else ""]
    return " ".join(p for p in parts if p)


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    shape: str
    color: str
    size: str
    row: int
    col: int

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} at the {cell_name(self.row, self.col)}"


@dataclasses.dataclass(frozen=True)
class Scene:
    shapes: tuple[ShapeSpec, ...]

    def caption(self) -> str:
        return " and ".join(s.phrase() for s in self.shapes)

    def attributes(self) -> list[dict]:
        """Ground truth as plain JSON-able dicts (for exact scoring of generations)."""
        return [dataclasses.asdict(s) for s in self.shapes]


def make_scene(seed: int, index: int, max_shapes: int = 3) -> Scene:
    rng = np.random.default_rng([seed, index, 0x5A4E])
    count = int(rng.integers(1, max_shapes + 1))
    cells = rng.choice(9, size=count, replace=False)
    colors = rng.choice(len(COLORS), size=count, replace=False)
    color_names = list(COLORS)
    specs = []
    for cell, color in zip(sorted(cells), colors):
        specs.append(ShapeSpec(
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            color=color_names[int(color)],
            size=tuple(SIZES)[int(rng.integers(len(SIZES)))],
            row=int(cell) // 3,
            col=int(cell) % 3,
        ))
    return Scene(tuple(specs))


def shape_mask(spec: ShapeSpec, px: int) -> np.ndarray:
    """Boolean [px, px] mask of one shape, sampled at pixel centres."""
    cell = px / 3.0
    cy, cx = (spec.row + 0.5) * cell, (spec.col + 0.5) * cell
    half = SIZES[spec.size] * cell / 2.0
    y, x = np.mgrid[0:px, 0:px] + 0.5
    dy, dx = y - cy, x - cx
    if spec.shape == "circle":
        return dy * dy + dx * dx <= half * half
    if spec.shape == "square":
        return (np.abs(dy) <= half) & (np.abs(dx) <= half)
    if spec.shape == "triangle":
        # Apex up: the half-width grows linearly from 0 at the top to `half` at the base.
        depth = (dy + half) / (2.0 * half)
        return (depth >= 0) & (depth <= 1) & (np.abs(dx) <= half * depth)
    raise ValueError(f"unknown shape {spec.shape!r}")


def render_scene(scene: Scene, px: int) -> np.ndarray:
    """uint8 [px, px, 3] RGB image of the scene."""
    image = np.zeros((px, px, 3), np.uint8)
    for spec in scene.shapes:
        image[shape_mask(spec, px)] = COLORS[spec.color]
    return image


def caption_vocabulary() -> list[str]:
    """Every word a shapes caption can use (seed text for the builtin tokenizer)."""
    words = {"a", "at", "the", "and", *SHAPES, *COLORS, *SIZES}
    for r in range(3):
        for c in range(3):
            words.update(cell_name(r, c).split())
    return sorted(words)
