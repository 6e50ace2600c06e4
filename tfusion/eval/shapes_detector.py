"""An exact, analytic detector for `shapes` images: pixels -> the shapes present.

It inverts data_pipelines/shapes.py's rendering rules instead of learning them:
  1. colour: every shape colour is a corner of the RGB cube and the background is
     black, so thresholding each channel at mid-range labels every pixel with one
     of the 8 corners (black = background, white = never rendered, ignored);
  2. objects: 8-connected components per colour (8, not 4: a small triangle's
     apex touches the rest of it only diagonally at low resolution);
  3. shape, size, grid cell: the component is compared (IoU) with the renderer's
     own mask of every (shape, size, cell) at this resolution; the best one wins,
     and components matching no template well (IoU < min_iou) are not objects.

On images the dataset rendered, the best template has IoU 1. At low resolution
some templates are pixel-identical (at 16 px a small circle and a small square in
5 of the 9 cells are the same 2x2 block): no detector can separate those, so a
detection carries every (shape, size) whose mask equals the best one's, and
scoring accepts any of them (see shapes_scoring.py).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import numpy as np
from scipy import ndimage

from data_pipelines import shapes

# Corner code r*4 + g*2 + b (channel above mid-range = 1) -> dataset colour name.
_CORNER_TO_COLOR = {
    (int(r > 127) * 4 + int(g > 127) * 2 + int(b > 127)): name
    for name, (r, g, b) in shapes.COLORS.items()
}
_EIGHT_CONNECTED = np.ones((3, 3), bool)
DEFAULT_MIN_IOU = 0.5


@dataclasses.dataclass(frozen=True)
class DetectedShape:
    color: str
    row: int
    col: int
    # Every (shape, size) whose rendered mask in this cell equals the best match;
    # more than one only where the resolution cannot tell them apart.
    candidates: tuple[tuple[str, str], ...]
    iou: float  # of the component with the best template (1.0 = exact render)
    area: int  # pixels in the component

    @property
    def shape(self) -> str:
        return self.candidates[0][0]

    @property
    def size(self) -> str:
        return self.candidates[0][1]

    @property
    def shapes(self) -> frozenset:
        return frozenset(s for s, _ in self.candidates)

    @property
    def sizes(self) -> frozenset:
        return frozenset(z for _, z in self.candidates)


def to_uint8_rgb(image, pixel_range: Optional[tuple[float, float]] = None) -> np.ndarray:
    """[H, W, 3] image -> uint8 [0, 255]. pixel_range defaults by dtype: uint8 is
    [0, 255], floats are [-1, 1] (the pipeline's and the model's convention)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {image.shape}")
    if pixel_range is None:
        pixel_range = (0.0, 255.0) if image.dtype == np.uint8 else (-1.0, 1.0)
    lo, hi = pixel_range
    unit = (image.astype(np.float64) - lo) / (hi - lo)
    return np.clip(np.round(unit * 255.0), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _templates(height: int, width: int):
    """(keys [(shape, size, row, col)], masks bool [K, H*W], twin index lists).

    twins[k] lists every template whose mask is identical to template k's.
    """
    if height != width:
        raise ValueError(f"shapes images are square, got {height}x{width}")
    keys, masks = [], []
    for row in range(3):
        for col in range(3):
            for shape in shapes.SHAPES:
                for size in shapes.SIZES:
                    spec = shapes.ShapeSpec(shape=shape, color="red", size=size, row=row, col=col)
                    keys.append((shape, size, row, col))
                    masks.append(shapes.shape_mask(spec, height).reshape(-1))
    masks = np.stack(masks)
    twins = [np.flatnonzero((masks == m).all(axis=1)).tolist() for m in masks]
    return keys, masks, twins


def _best_template(component: np.ndarray, height: int, width: int):
    """(template index, IoU) of the best-matching rendered mask for one component."""
    _, masks, _ = _templates(height, width)
    flat = component.reshape(-1)
    inter = (masks & flat).sum(axis=1)
    union = (masks | flat).sum(axis=1)
    iou = inter / np.maximum(union, 1)
    best = int(np.argmax(iou))
    return best, float(iou[best])


def color_labels(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> int [H, W] RGB-cube corner code per pixel (0 = black)."""
    bits = (rgb > 127).astype(np.int32)
    return bits[..., 0] * 4 + bits[..., 1] * 2 + bits[..., 2]


def detect_shapes(image, pixel_range: Optional[tuple[float, float]] = None,
                  min_iou: float = DEFAULT_MIN_IOU) -> list[DetectedShape]:
    """Every shape found in one [H, W, 3] image, in grid-cell order."""
    rgb = to_uint8_rgb(image, pixel_range)
    height, width = rgb.shape[:2]
    keys, _, twins = _templates(height, width)
    codes = color_labels(rgb)
    _, masks, _ = _templates(height, width)
    # IoU <= smaller area / larger area: components outside these bounds cannot reach
    # min_iou with any template (skips the many specks of a noisy image cheaply).
    areas = masks.sum(axis=1)
    lo, hi = min_iou * areas.min(), areas.max() / max(min_iou, 1e-9)
    found = []
    for code, color in _CORNER_TO_COLOR.items():
        labels, n = ndimage.label(codes == code, structure=_EIGHT_CONNECTED)
        sizes = np.bincount(labels.reshape(-1), minlength=n + 1)
        for index in np.flatnonzero((sizes >= lo) & (sizes <= hi)):
            if index == 0:
                continue
            component = labels == index
            best, iou = _best_template(component, height, width)
            if iou < min_iou:
                continue
            _, _, row, col = keys[best]
            candidates = tuple(keys[t][:2] for t in twins[best])
            found.append(DetectedShape(color=color, row=row, col=col, candidates=candidates,
                                       iou=iou, area=int(component.sum())))
    return sorted(found, key=lambda d: (d.row, d.col, d.color))


def detect_batch(images, pixel_range: Optional[tuple[float, float]] = None,
                 min_iou: float = DEFAULT_MIN_IOU) -> list[list[DetectedShape]]:
    """detect_shapes over [N, H, W, 3]."""
    return [detect_shapes(image, pixel_range, min_iou) for image in np.asarray(images)]
