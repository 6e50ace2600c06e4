"""Nothing lost silently, and data that cannot train stops the run early with a reason.

Expected numbers come from the fixtures themselves (which files are corrupt, which
synthetic records are bad, and an independent sliding-window scan), never from the
pipeline's own counters.
"""
import json
import re

import grain
import numpy as np
import pytest

from data_pipelines import UnusableDataError, make_train_iterator, validate_data_config
from data_pipelines.file_sources import CAPTIONS_FILE
from data_pipelines.records import ImageCaptionRecord
from tests.helpers.data_fixtures import CORRUPT, FOLDER_IMAGES, data_config_for, image_name, write_folder
from tfusion.batch import validate_batch
from tfusion.config import ConfigError

@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tok"))


def records_read(message: str) -> int:
    return int(re.search(r"Records read: (\d+)", message).group(1))


# --- counts and examples ------------------------------------------------------------

def test_corrupt_images_are_counted_exactly_and_named(tmp_path, tok_dir):
    config = data_config_for(tok_dir, write_folder(tmp_path, corrupt=CORRUPT))
    validate_data_config(config)
    it = make_train_iterator(config)
    for _ in range(3):
        validate_batch(next(it), it.spec, it.pad_id)
    counts = it.data_counts()
    read = counts["data_records_read"]
    assert read > FOLDER_IMAGES  # the folder repeated at least once
    expected = sum(i % FOLDER_IMAGES in CORRUPT for i in range(read))
    assert counts["data_skipped_corrupt_image"] == expected
    assert sum(v for k, v in counts.items() if k.startswith("data_skipped_")) == expected
    example = it.skip_examples()["corrupt_image"]
    first_corrupt = min(CORRUPT)
    assert image_name(first_corrupt) in example
    assert f"{CAPTIONS_FILE} line {first_corrupt + 1}" in example


def synthetic_records(is_bad, n=10_000):
    """Good records: a 16 px array and a caption; bad ones: a source error."""
    pixels = np.full((16, 16, 3), 200, np.uint8)

    def record(i):
        if is_bad(i):
            return ImageCaptionRecord(None, None, error="synthetic_bad",
                                      error_detail=f"record {i} is bad")
        return ImageCaptionRecord(pixels, "a red square")

    return grain.MapDataset.range(n).map(record)


def test_data_counts_and_examples_survive_state(tok_dir):
    config = data_config_for(tok_dir, source="shapes")

    def is_bad(i):
        return i % 10 < 3

    it = make_train_iterator(config, image_records=synthetic_records(is_bad))
    for _ in range(2):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    restored = make_train_iterator(config, image_records=synthetic_records(is_bad))
    restored.set_state(state)
    assert restored.data_counts() == it.data_counts()
    assert restored.skip_examples() == it.skip_examples() == {"synthetic_bad": "record 0 is bad"}
    next(it), next(restored)
    counts = restored.data_counts()
    assert counts == it.data_counts()
    read = counts["data_records_read"]
    assert counts["data_skipped_synthetic_bad"] == sum(is_bad(i) for i in range(read))


# --- folder metadata at start-up ----------------------------------------------------

@pytest.mark.parametrize("image_key, caption_key, missing", [
    ("img", "caption", ["'file', 'file_name', 'image', 'path'", "['img', 'caption']"]),
    ("file", "label", ["'caption', 'text'", "['file', 'label']"]),
])
def test_folder_with_unknown_keys_is_refused_at_start_up(tmp_path, tok_dir, image_key,
                                                         caption_key, missing):
    config = data_config_for(tok_dir, write_folder(tmp_path, n=5, image_key=image_key,
                                                   caption_key=caption_key))
    with pytest.raises(ConfigError, match="data.data_dir") as e:
        validate_data_config(config)
    for text in missing:
        assert text in str(e.value)


def test_folder_without_captions_file_is_refused(tmp_path, tok_dir):
    with pytest.raises(ConfigError, match=f"data.data_dir.*{CAPTIONS_FILE}"):
        validate_data_config(data_config_for(tok_dir, str(tmp_path)))


@pytest.mark.parametrize("image_key, caption_key", [("image", "caption"), ("file_name", "text"),
                                                    ("path", "caption")])
def test_folder_accepts_every_documented_key(tmp_path, tok_dir, image_key, caption_key):
    config = data_config_for(tok_dir, write_folder(tmp_path, n=8, image_key=image_key,
                                                   caption_key=caption_key))
    validate_data_config(config)
    it = make_train_iterator(config)
    batch = next(it)
    validate_batch(batch, it.spec, it.pad_id)
    assert batch["image_mask"].any()
    counts = it.data_counts()
    assert counts["data_records_read"] > 0
    assert not [k for k in counts if k.startswith("data_skipped_")]


# --- giving up ------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 1])
def test_all_corrupt_stops_within_the_limit(tmp_path, tok_dir, workers):
    config = data_config_for(tok_dir, write_folder(tmp_path, n=20, corrupt=frozenset(range(20))))
    config.data.max_records_without_usable = 50
    config.data.num_workers = workers
    validate_data_config(config)
    it = make_train_iterator(config)
    try:
        with pytest.raises(UnusableDataError) as e:
            next(it)
    finally:
        it.close()
    message = str(e.value)
    assert "data.max_records_without_usable=50" in message
    assert "corrupt_image: " in message and image_name(0) in message
    # Each packer (one per worker) gives up on its own 50th record.
    assert records_read(message) == 50


def first_window_over(bad: list[bool], window: int, fraction: float) -> int:
    """Records read when the skipped fraction of the last `window` first exceeds
    `fraction` (0 if never), by a direct scan."""
    for n in range(window, len(bad) + 1):
        if sum(bad[n - window:n]) / window > fraction:
            return n
    return 0


def bad_fraction_config(tok_dir, window):
    config = data_config_for(tok_dir, source="shapes")
    config.data.bad_fraction_window = window
    config.data.max_bad_fraction = 0.5
    return config


def test_bad_fraction_under_the_limit_trains(tok_dir):
    it = make_train_iterator(bad_fraction_config(tok_dir, 50),
                             image_records=synthetic_records(lambda i: i % 10 < 3))
    for _ in range(6):
        next(it)
    assert it.data_counts()["data_records_read"] > 100


def test_bad_fraction_over_the_limit_stops_at_the_same_record_after_restore(tok_dir):
    def is_bad(i):  # 40% bad (under the limit) for a while, then 70%
        return i % 10 < (4 if i < 300 else 7)

    window = 200
    config = bad_fraction_config(tok_dir, window)
    expected = first_window_over([is_bad(i) for i in range(600)], window, 0.5)
    assert expected > 300

    it = make_train_iterator(config, image_records=synthetic_records(is_bad))
    states = []
    with pytest.raises(UnusableDataError) as e:
        while True:
            next(it)
            states.append(json.loads(json.dumps(it.get_state())))
    message = str(e.value)
    assert records_read(message) == expected
    assert "data.max_bad_fraction=0.5" in message
    assert "synthetic_bad: " in message and "record 0 is bad" in message

    # The last state before the stop holds a window that decides when it comes.
    restored = make_train_iterator(config, image_records=synthetic_records(is_bad))
    restored.set_state(states[-1])
    assert expected - restored.data_counts()["data_records_read"] < window
    with pytest.raises(UnusableDataError) as again:
        while True:
            next(restored)
    assert str(again.value) == message
