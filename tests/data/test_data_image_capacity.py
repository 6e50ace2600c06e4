"""data.image_capacity_per_row: the packer fills every unit (one device's rows of one
microbatch, as the train step splits them) to at most its image capacity, defers and
counts rows that do not fit, resumes exactly, and refuses a capacity the data cannot
get through."""
import json

import numpy as np
import pytest

from data_pipelines import example_config, make_train_iterator, validate_data_config
from data_pipelines.records import UnusableDataError
from tfusion.config import ConfigError
from tfusion.train.step import split_microbatches

GROUPS, ACCUM = 2, 2  # 8 rows: 2 devices x 2 microbatches -> units of 2 rows


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    c = example_config.get_config()
    c.data.tokenizer_cache_dir = str(tmp_path_factory.mktemp("tok"))
    c.train.grad_accum_steps = ACCUM
    return c


def _with(config, per_row):
    c = config.copy_and_resolve_references()
    c.data.image_capacity_per_row = per_row
    return c


def _unit_images(batch) -> np.ndarray:
    """Images per (microbatch, device) unit, cut the way the train step cuts them:
    split_microbatches, then each device's consecutive rows of a microbatch."""
    micro = np.asarray(split_microbatches(batch["image_mask"], ACCUM, None, None))
    return micro.reshape(ACCUM, GROUPS, -1).sum(-1)


def _rows(batches):
    return [tuple(b["tokens"][r]) for b in batches for r in range(b["tokens"].shape[0])]


def test_units_never_exceed_capacity_and_rows_are_only_delayed(config):
    free = make_train_iterator(config)
    reference = [next(free) for _ in range(40)]
    assert max(_unit_images(b).max() for b in reference) == 4  # some units need 4
    c = _with(config, 1.5)  # 3 images per 2-row unit
    validate_data_config(c)
    it = make_train_iterator(c, image_groups=GROUPS)
    batches = [next(it) for _ in range(30)]
    assert max(_unit_images(b).max() for b in batches) <= 3
    deferred = it.data_counts()["data_deferred_image_capacity"]
    assert deferred > 0
    # Deferral only reorders rows: each row packed with capacity is one the free
    # packer produced (it packs the same rows, in closing order).
    assert set(_rows(batches)) <= set(_rows(reference))
    assert it.stats().packing_efficiency == pytest.approx(
        sum(b["segment_ids"].astype(bool).sum() for b in batches) / (30 * 8 * 256))


def test_capacity_state_resumes_exactly(config):
    c = _with(config, 1.5)
    it = make_train_iterator(c, image_groups=GROUPS)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    resumed = make_train_iterator(c, image_groups=GROUPS)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_a_capacity_the_data_cannot_pass_stops_with_the_field(config):
    c = _with(config, 0.75)  # 2 images per 2-row unit: below what the mixture brings
    it = make_train_iterator(c, image_groups=GROUPS)
    with pytest.raises(UnusableDataError, match="data.image_capacity_per_row=0.75"):
        for _ in range(100):
            next(it)


def test_capacity_below_a_full_row_is_refused_at_start_up(config):
    from tfusion.train.validate import validate_mesh_config

    c = _with(config, 1.5)
    c.mesh = dict(data=1, fsdp=GROUPS, tensor=1)
    with pytest.raises(ConfigError, match=r"data\.image_capacity_per_row: 1\.5 x 2 rows .* = 3 "
                                          r"images, fewer than one full row's 4 slots"):
        validate_mesh_config(c, num_devices=GROUPS, process_count=1)
    c.data.image_capacity_per_row = 2.0  # 4 images per unit: a full row fits
    validate_mesh_config(c, num_devices=GROUPS, process_count=1)
