"""The edit suite end to end with stand-in editors (no trained model needed): a perfect
editor (the input read by the detector, the instruction parsed and applied by an
independent reference, rendered) scores 1, the identity 0 on every kind but
"preserved", another scene near chance."""
import json

import numpy as np
import pytest

from data_pipelines import shapes
from experiments import registry
from tests.helpers.edit_reference import apply_instruction
from tfusion.eval.shapes_detector import detect_shapes
from tfusion.eval.suites import EvalOptions, run_eval_suite

PX = 16
OPTIONS = EvalOptions(edit_prompts=60, grid_images=6, progress=False)


def _pixels(scene):
    return shapes.render_scene(scene, PX).astype(np.float32) / 127.5 - 1.0


class PerfectEditor:
    def edits(self, pixels, instructions, guidance):
        out = []
        for image, instruction in zip(pixels, instructions):
            found = detect_shapes(image)
            scene = shapes.Scene(tuple(shapes.ShapeSpec(d.shape, d.color, d.size, d.row, d.col)
                                       for d in found))
            edited = apply_instruction(instruction, scene)
            out.append(_pixels(shapes.Scene(tuple(shapes.ShapeSpec(*o) for o in edited))))
        return np.stack(out)


class IdentityEditor:
    def edits(self, pixels, instructions, guidance):
        return np.asarray(pixels)


class OtherSceneEditor:
    def edits(self, pixels, instructions, guidance):
        return np.stack([_pixels(shapes.make_scene(5, i, 3)) for i in range(len(pixels))])


@pytest.fixture(scope="module")
def config():
    c = registry.get_config("shapes_edit_tiny")
    c.train.init_from = ""
    return c


def _run(config, tmp_path, editor):
    return run_eval_suite("edit", None, config, str(tmp_path), step=3, options=OPTIONS,
                          sampler=editor)["edit"]


def test_perfect_editor_scores_one(config, tmp_path):
    result = _run(config, tmp_path, PerfectEditor())
    for kind, scores in result["scores"].items():
        assert scores["exact"] == scores["edited"] == scores["preserved"] == 1.0, kind
        assert scores["edits"] == (60 if kind == "all" else 12)
    assert result["perfect_editor"]["exact"] == 1.0
    saved = json.load(open(tmp_path / "eval" / "edit.json"))
    assert saved["metrics"]["scores"]["all"]["exact"] == 1.0
    assert (tmp_path / "eval" / "edit_grid_step3.png").exists()


def test_identity_editor_changes_nothing(config, tmp_path):
    result = _run(config, tmp_path, IdentityEditor())
    for kind, scores in result["scores"].items():
        assert scores["exact"] == 0.0 and scores["edited"] == 0.0, kind
        assert scores["preserved"] == 1.0, kind
    assert result["identity_editor"] == result["scores"]["all"]


def test_other_scene_scores_near_chance(config, tmp_path):
    result = _run(config, tmp_path, OtherSceneEditor())["scores"]
    assert result["all"]["exact"] <= 0.05
    assert result["all"]["preserved"] < 0.5
    assert result["recolor"]["edited"] < 0.3 and result["move"]["edited"] < 0.3


def test_edit_suite_refuses_other_data(tmp_path):
    plain = registry.get_config("shapes_tiny")
    with pytest.raises(ValueError, match="shapes_edit"):
        run_eval_suite("edit", None, plain, str(tmp_path), options=OPTIONS,
                       sampler=IdentityEditor())
