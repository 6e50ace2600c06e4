"""launch.generate and write_sample_grid on a shapes_tiny checkpoint made by the trainer."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers.train_fixtures import TINY_CLI_OVERRIDES
from tests.helpers import REPO_ROOT

ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT,
           XLA_FLAGS="--xla_force_host_platform_device_count=1")
pytestmark = pytest.mark.slow


def _run(args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("run"))
    _run(["launch.train", "--config=experiments/registry.py:shapes_tiny", f"--workdir={path}",
          *TINY_CLI_OVERRIDES, "--config.train.steps=2", "--config.train.log_every=1"])
    return path


def test_caption_to_png_and_image_to_caption(workdir, tmp_path):
    out = str(tmp_path / "t2i")
    _run(["launch.generate", f"--workdir={workdir}", "--prompt=a red circle", f"--out={out}",
          "--steps=3", "--num_samples=2", "--max_new_tokens=3"])
    png = Image.open(os.path.join(out, "sample_1_image_0.png"))
    assert png.size == (16, 16)
    assert "<image: sample_0_image_0.png>" in open(os.path.join(out, "sample_0.txt")).read()
    out2 = str(tmp_path / "caption")
    _run(["launch.generate", f"--workdir={workdir}", f"--image={os.path.join(out, 'sample_0_image_0.png')}",
          f"--out={out2}", "--max_new_tokens=5", "--temperature=1.0"])
    text = open(os.path.join(out2, "sample_0.txt")).read()
    assert "<image:" not in text and text.strip()  # some caption text, no image


def test_write_sample_grid(workdir, tmp_path):
    from data_pipelines import build_tokenizer
    from tfusion.eval.checkpoints import load_model
    from tfusion.inference.model_sampler import write_sample_grid

    model, config, _ = load_model(workdir)
    path = write_sample_grid(model, config, build_tokenizer(config), ["a red circle", "a cat"],
                             str(tmp_path / "samples" / "step_2.png"), seed=0, steps=2)
    assert np.asarray(Image.open(path)).ndim == 3
    assert open(str(tmp_path / "samples" / "step_2.txt")).read().split("\n")[:2] == \
        ["a red circle", "a cat"]


def _fails(args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode != 0
    return proc.stderr


def test_generate_and_evaluate_take_an_attention_kernel(workdir, tmp_path):
    out = _run(["launch.generate", f"--workdir={workdir}", "--prompt=a red circle",
                f"--out={tmp_path / 'flash'}", "--steps=2", "--max_new_tokens=2",
                "--attention_kernel=flash"])
    assert "attention flash" in out
    assert os.path.isfile(str(tmp_path / "flash" / "sample_0_image_0.png"))
    out = _run(["launch.evaluate", f"--workdir={workdir}", "--suite=text", "--no_progress",
                "--attention_kernel=xla"])
    assert "text/perplexity" in out
    err = _fails(["launch.generate", f"--workdir={workdir}", f"--out={tmp_path / 'x'}",
                  "--attention_kernel=nope"])
    assert "error: config.model.attention_kernel" in err


def test_exported_params_generate_like_the_run(workdir, tmp_path):
    exported = str(tmp_path / "export")
    _run(["launch.export", f"--workdir={workdir}", f"--out={exported}"])
    _run(["launch.export", f"--workdir={workdir}", f"--out={tmp_path / 'st'}",
          "--format=safetensors", "--params=raw"])
    assert os.path.getsize(str(tmp_path / "st" / "model.safetensors")) > 0
    args = ["--prompt=a red circle", "--steps=2", "--max_new_tokens=2"]
    _run(["launch.generate", f"--workdir={workdir}", f"--out={tmp_path / 'a'}", *args])
    _run(["launch.generate", f"--workdir={exported}", f"--out={tmp_path / 'b'}", *args])
    a = np.asarray(Image.open(str(tmp_path / "a" / "sample_0_image_0.png")))
    b = np.asarray(Image.open(str(tmp_path / "b" / "sample_0_image_0.png")))
    np.testing.assert_array_equal(a, b)


def test_edit_writes_the_edited_image_as_the_sampler_edits(workdir, tmp_path):
    """--edit: BOS BOI image EOI prompt BOI, guided on the instruction; the PNG equals
    ModelSampler.edits on the same image, seed and steps."""
    from data_pipelines import build_tokenizer, shapes
    from tfusion.eval.checkpoints import load_model
    from tfusion.inference.model_sampler import ModelSampler, SamplingSettings, to_uint8

    scene = shapes.make_scene(0, 3, 2)
    source = shapes.render_scene(scene, 16)
    path = str(tmp_path / "in.png")
    Image.fromarray(source).save(path)
    out = str(tmp_path / "edit")
    _run(["launch.generate", f"--workdir={workdir}", f"--image={path}", f"--out={out}",
          "--prompt=make the red circle blue", "--edit", "--steps=3"])
    assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == ["sample_0_image_0.png"]
    got = np.asarray(Image.open(os.path.join(out, "sample_0_image_0.png")))
    model, config, _ = load_model(workdir)
    sampler = ModelSampler(model, config, build_tokenizer(config), SamplingSettings(steps=3))
    expected = sampler.edits(source[None].astype(np.float32) / 127.5 - 1.0,
                             ["make the red circle blue"])
    np.testing.assert_array_equal(got, to_uint8(expected)[0])
    assert "--edit needs --image" in _fails(["launch.generate", f"--workdir={workdir}",
                                             f"--out={out}", "--prompt=x", "--edit"])
