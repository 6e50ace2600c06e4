"""The shapes set (exact, analytic ground truth) and image preparation."""
import io

import numpy as np
import pytest
from PIL import Image

from data_pipelines import shapes
from data_pipelines.images import prepare_image
from data_pipelines.records import BadRecord


def detect(image: np.ndarray):
    """Independent detector: colour -> (pixel count, grid cell of its centroid)."""
    px = image.shape[0]
    found = {}
    for name, rgb in shapes.COLORS.items():
        mask = np.all(image == np.array(rgb, np.uint8), axis=-1)
        if mask.any():
            ys, xs = np.nonzero(mask)
            found[name] = (int(mask.sum()), int(ys.mean() * 3 // px), int(xs.mean() * 3 // px))
    return found


@pytest.mark.parametrize("px", [16, 32, 64])
def test_rendered_scene_matches_its_attributes_and_caption(px):
    for index in range(30):
        scene = shapes.make_scene(seed=3, index=index)
        image = shapes.render_scene(scene, px)
        found = detect(image)
        assert set(found) == {s.color for s in scene.shapes}
        background = np.all(image == 0, axis=-1).sum()
        assert background + sum(n for n, _, _ in found.values()) == px * px
        for spec in scene.shapes:
            count, row, col = found[spec.color]
            assert (row, col) == (spec.row, spec.col)
            # Size from area: the threshold is the geometric mean of the two sizes'
            # ideal areas (fill factor of the shape times its squared side).
            fill = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}[spec.shape]
            threshold = fill * (px / 3) ** 2 * shapes.SIZES["small"] * shapes.SIZES["large"]
            assert (count > threshold) == (spec.size == "large"), (spec, count)
            assert spec.phrase() in scene.caption()
        assert scene.caption().count(" and ") == len(scene.shapes) - 1


def test_scenes_are_deterministic_and_varied():
    assert shapes.make_scene(0, 7) == shapes.make_scene(0, 7)
    assert shapes.make_scene(0, 7) != shapes.make_scene(1, 7)
    captions = {shapes.make_scene(0, i).caption() for i in range(200)}
    assert len(captions) > 150
    counts = {len(shapes.make_scene(0, i).shapes) for i in range(200)}
    assert counts == {1, 2, 3}


def test_shapes_are_distinguishable_by_silhouette():
    # At 48 px a large circle, square and triangle cover ~pi/4, 1 and 1/2 of their box.
    px = 48
    areas = {}
    for shape in shapes.SHAPES:
        spec = shapes.ShapeSpec(shape, "red", "large", 1, 1)
        areas[shape] = shapes.shape_mask(spec, px).sum() / (0.9 * px / 3) ** 2
    assert areas["triangle"] < 0.6 < areas["circle"] < 0.85 < areas["square"]


def encoded(image: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_prepare_image_crops_resizes_and_scales():
    # A 30x10 image: red left third, green centre, blue right third (each 10 px).
    array = np.zeros((10, 30, 3), np.uint8)
    array[:, :10, 0] = array[:, 10:20, 1] = array[:, 20:, 2] = 255
    out, repairs = prepare_image(encoded(Image.fromarray(array)), 4)
    assert out.shape == (4, 4, 3) and out.dtype == np.float32 and repairs == ()
    assert np.allclose(out[..., 1], 1.0, atol=1e-6)  # the centre crop is all green
    assert np.allclose(out[..., 0], -1.0, atol=1e-6)


@pytest.mark.parametrize("mode, repair", [("L", "grayscale_to_rgb"), ("RGBA", "alpha_to_rgb"),
                                          ("P", "palette_to_rgb"), ("1", "grayscale_to_rgb")])
def test_prepare_image_converts_modes_and_reports_it(mode, repair):
    image = Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).convert(mode)
    out, repairs = prepare_image(encoded(image), 8)
    assert repairs == (repair,) and out.shape == (8, 8, 3)
    assert out.min() >= -1.0 and out.max() <= 1.0


@pytest.mark.parametrize("source, reason", [
    (b"", "empty_image_bytes"), (b"\x89PNG\r\n\x1a\n garbage", "corrupt_image"),
    (np.zeros((0, 5, 3), np.uint8), "zero_size_image"), (None, "missing_image"),
    (np.zeros((4, 4, 3), np.float64), "unsupported_image_array"),
])
def test_prepare_image_rejects_bad_input_with_a_reason(source, reason):
    with pytest.raises(BadRecord) as e:
        prepare_image(source, 8)
    assert e.value.reason == reason
