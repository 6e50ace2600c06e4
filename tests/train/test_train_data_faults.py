"""Bad data as a user meets it in training: counted where the user looks (metrics.jsonl,
the console line), or stopped early with the reason and exit code of launch.train.

Expected counts come from the fixture folder (which files are corrupt and the read
order of an unshuffled source), not from the pipeline's own counters.
"""
import json
import logging
import os
import subprocess
import sys

import pytest

from tests.helpers.data_fixtures import CORRUPT, FOLDER_IMAGES, write_folder
from launch.train_setup import train
from tests.helpers.train_fixtures import TINY_CLI_OVERRIDES
from tests.helpers import REPO_ROOT



@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tok"))


def _folder_config(data_dir, tok_dir, steps):
    """shapes_tiny shrunk to seconds, reading an unshuffled image-only folder: record r
    of the stream is image r % FOLDER_IMAGES."""
    from experiments import registry

    c = registry.get_config("shapes_tiny")
    c.model.update(width=32, depth=2, num_heads=2, patch_size=4, timestep_embed_dim=16)
    c.data.update(source="folder", data_dir=data_dir, text_source="none", shuffle=False,
                  eval_examples=0, seq_len=64, max_images_per_row=2, multi_image_fraction=0.0,
                  tokenizer_cache_dir=tok_dir)
    c.train.update(steps=steps, batch_size=8, log_every=1, eval_every=0, sample_every=0,
                   checkpoint_every=0, final_eval_suite="")
    c.optimizer.warmup_steps = 2
    return c


def test_training_on_a_folder_with_30_percent_corrupt_images_reports_exact_counts(
        tmp_path, tok_dir, caplog):
    (tmp_path / "folder").mkdir()
    data_dir = write_folder(tmp_path / "folder", corrupt=CORRUPT)
    workdir = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="tfusion"):
        result = train(_folder_config(data_dir, tok_dir, steps=12), str(workdir))
    assert result.step == 12
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert len(train_rows) == 12
    for row in train_rows:
        read = row["data_records_read"]
        expected = sum(i % FOLDER_IMAGES in CORRUPT for i in range(read))
        assert row["data_skipped_corrupt_image"] == expected
        assert sum(v for k, v in row.items() if k.startswith("data_skipped_")) == expected
    assert train_rows[-1]["data_records_read"] > FOLDER_IMAGES  # the folder came round
    expected_last = sum(i % FOLDER_IMAGES in CORRUPT
                        for i in range(train_rows[-1]["data_records_read"]))
    assert f"skipped {expected_last} (corrupt_image {expected_last})" in caplog.text
    assert result.last_metrics["data"]["data_skipped_corrupt_image"] == expected_last


def _launch_train(workdir, data_dir, tok_dir):
    return subprocess.run(
        [sys.executable, "-m", "launch.train", "--config=experiments/registry.py:shapes_tiny",
         f"--workdir={workdir}", *TINY_CLI_OVERRIDES, "--config.data.source=folder",
         f"--config.data.data_dir={data_dir}", f"--config.data.tokenizer_cache_dir={tok_dir}",
         "--config.data.eval_examples=4", "--config.train.steps=4", "--config.train.eval_every=0",
         "--config.train.sample_every=0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "XLA_FLAGS": ""})  # one CPU device: the 4-row batch splits


def test_launch_train_refuses_a_folder_whose_lines_name_no_image_key(tmp_path, tok_dir):
    (tmp_path / "folder").mkdir()
    data_dir = write_folder(tmp_path / "folder", image_key="img")
    run = _launch_train(tmp_path / "run", data_dir, tok_dir)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "config.data.data_dir" in run.stderr
    assert "'file', 'file_name', 'image', 'path'" in run.stderr
    assert "['caption', 'img']" in run.stderr or "['img', 'caption']" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.slow
def test_launch_train_stops_early_when_no_image_is_usable(tmp_path, tok_dir):
    (tmp_path / "folder").mkdir()
    data_dir = write_folder(tmp_path / "folder", corrupt=frozenset(range(FOLDER_IMAGES)))
    run = _launch_train(tmp_path / "run", data_dir, tok_dir)
    assert run.returncode == 4, run.stderr[-2000:]
    # Captions still make usable text documents, so the bad-fraction window stops it.
    assert "unusable data: data.max_bad_fraction=0.5 stopped the input pipeline" in run.stderr
    assert "corrupt_image" in run.stderr and "img" in run.stderr
    assert "Traceback" not in run.stderr
