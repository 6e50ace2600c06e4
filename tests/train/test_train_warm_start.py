"""train.init_from (warm start from another run's params) and train.freeze (param
groups with no updates and no optimizer state), against the source run's checkpoint
read back independently, and across a resume."""
import json
import os
import shutil

import jax
import numpy as np
import optax
import pytest

from tests.helpers.train_fixtures import synthetic_config, synthetic_iterator_fn
from tfusion.config import ConfigError
from tfusion.eval.checkpoints import load_model
from tfusion.eval.export import flat_names
from tfusion.train import optimizer
from tfusion.train.loop import Trainer
from tfusion.train.state import to_pure


def _run(workdir, steps, **train):
    config = synthetic_config(steps=steps, ema_decay=0.9, **train)
    trainer = Trainer(config, str(workdir), devices=jax.devices()[:1],
                      train_iterator_fn=synthetic_iterator_fn())
    trainer.run()
    return trainer


def _flat(tree):
    return {k: np.asarray(v) for k, v in flat_names(to_pure(tree)).items()}


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("source")
    _run(workdir, steps=4)
    return str(workdir)


def test_warm_start_loads_matching_params_and_initialises_the_rest(source_run, tmp_path):
    source = _flat(nnx_params(load_model(source_run, params="ema")[0]))
    # A bigger vocab (64 -> 96 ids, both padded to 128 rows): the embedding and head
    # load ids 0..63 and keep fresh rows for 64..95; everything else matches.
    config = synthetic_config(steps=1, init_from=source_run, ema_decay=0.9)
    workdir = str(tmp_path / "warm")
    config.model.vocab_size = 96
    scratch = synthetic_config(steps=1)
    scratch.model.vocab_size = 96
    fresh = _flat(Trainer(scratch, str(tmp_path / "fresh"), devices=jax.devices()[:1],
                          train_iterator_fn=synthetic_iterator_fn())
                  .restore_or_init(None)["params"])
    trainer = Trainer(config, workdir, devices=jax.devices()[:1],
                      train_iterator_fn=synthetic_iterator_fn())
    state = trainer.restore_or_init(synthetic_iterator_fn()(config, process_index=0,
                                                            process_count=1))
    got = _flat(state["params"])
    report = json.load(open(os.path.join(workdir, "warm_start.json")))
    assert report["new"] == [] and len(report["vocab_rows"]) == 2, report
    assert report["entry"] == "ema_params" and report["step"] == 4
    rows = {"embed": (slice(None, 64), slice(64, 96)),
            "lm_head.kernel": ((slice(None), slice(None, 64)), (slice(None), slice(64, 96)))}
    for name, value in got.items():
        if name in rows:
            old, new = rows[name]
            np.testing.assert_array_equal(value[old], source[name][old], err_msg=name)
            # The new ids: a fresh initialisation (same seed), not the source's zero pad.
            np.testing.assert_array_equal(value[new], fresh[name][new], err_msg=name)
            assert np.abs(value[new]).max() > 0 and not source[name][new].any()
        else:
            np.testing.assert_array_equal(value, source[name], err_msg=name)
    assert sorted(report["loaded"]) == sorted(got)
    for a, b in zip(jax.tree.leaves(state["ema_params"]), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def nnx_params(model):
    from flax import nnx
    return nnx.state(model, nnx.Param)


FROZEN_STEPS = 4


def _frozen_run(workdir, source_run):
    _run(workdir, steps=FROZEN_STEPS, init_from=source_run, freeze=("text",))
    return _flat(nnx_params(load_model(str(workdir), params="raw")[0]))


def test_freeze_keeps_params_bit_identical(source_run, tmp_path):
    source = _flat(nnx_params(load_model(source_run, params="ema")[0]))
    after = _frozen_run(tmp_path / "frozen", source_run)
    ema = _flat(nnx_params(load_model(str(tmp_path / "frozen"), params="ema")[0]))
    text = optimizer.PARAM_GROUPS["text"]
    frozen = [n for n in after if text(tuple(n.split(".")))]
    assert frozen and len(frozen) < len(after)
    for name in after:
        if name in frozen:
            np.testing.assert_array_equal(after[name], source[name], err_msg=name)
            np.testing.assert_array_equal(ema[name], source[name], err_msg=name)
        else:  # the image layers did train
            assert np.abs(after[name] - source[name]).max() > 0, name


def test_untied_warm_start_copies_the_twins_and_freezing_text_keeps_the_lm(source_run,
                                                                          tmp_path):
    """LMFusion's recipe on a shared source: the untied run loads the text side, starts
    every image twin as a copy of its loaded text weight, and after training with
    train.freeze=text the text side is the source's bit for bit while the twins moved."""
    from tfusion.model.transfusion import image_twin_of

    source = _flat(nnx_params(load_model(source_run, params="ema")[0]))
    workdir = tmp_path / "untied"
    config = synthetic_config(steps=FROZEN_STEPS, ema_decay=0.9, init_from=source_run,
                              freeze=("text",))
    config.model.update(modality_weights="untied", untied_init="copy", untied_tile=16)
    start = Trainer(config, str(tmp_path / "start"), devices=jax.devices()[:1],
                    train_iterator_fn=synthetic_iterator_fn())
    at_start = _flat(start.restore_or_init(synthetic_iterator_fn()(
        config, process_index=0, process_count=1))["params"])
    Trainer(config, str(workdir), devices=jax.devices()[:1],
            train_iterator_fn=synthetic_iterator_fn()).run()
    report = json.load(open(workdir / "warm_start.json"))
    twins = {n: ".".join(image_twin_of(tuple(n.split("."))))
             for n in report["copied_from_text"]}
    assert len(twins) >= 6 and sorted(twins) == sorted(
        n for n in report["new"] if n.split(".")[0] == "backbone" or n == "image_final_norm.scale")
    for twin, text in twins.items():
        np.testing.assert_array_equal(at_start[twin], source[text], err_msg=twin)
    after = _flat(nnx_params(load_model(str(workdir), params="raw")[0]))
    for name, value in after.items():
        if name in twins:  # copied from the text weight, then trained
            assert np.abs(value - source[twins[name]]).max() > 0, name
        elif name in source and optimizer.PARAM_GROUPS["text"](tuple(name.split("."))):
            np.testing.assert_array_equal(value, source[name], err_msg=name)


@pytest.mark.slow
def test_frozen_run_resumes_exactly(source_run, tmp_path):
    """A frozen warm-started run stopped after step 2 (its later checkpoint removed) and
    resumed reads its own checkpoint, not init_from again, and ends bit-identical to an
    uninterrupted one."""
    straight = _frozen_run(tmp_path / "straight", source_run)
    resumed = tmp_path / "resumed"
    _frozen_run(resumed, source_run)
    shutil.rmtree(resumed / "checkpoints" / str(FROZEN_STEPS))
    again = _frozen_run(resumed, source_run)
    for name in again:
        np.testing.assert_array_equal(again[name], straight[name], err_msg=name)


def test_frozen_params_have_no_optimizer_state():
    config = synthetic_config()
    params = {"embed": np.zeros((4, 3)), "backbone": {"w": np.zeros((3, 3))},
              "image_encoder": {"w": np.zeros((3, 2))}}
    tx = optimizer.make_optimizer(config.optimizer, ("text",))
    state = tx.init(params)
    moments = [x for x in jax.tree.leaves(state) if hasattr(x, "shape") and x.ndim]
    # Adam's two moments of the one trained leaf only.
    assert sorted(m.shape for m in moments) == [(3, 2), (3, 2)]
    grads = jax.tree.map(np.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    assert not np.asarray(updates["embed"]).any() and not np.asarray(updates["backbone"]["w"]).any()
    assert np.asarray(updates["image_encoder"]["w"]).any()
    assert isinstance(state, optax.MultiTransformState)


@pytest.mark.parametrize("train,field", [
    (dict(freeze=("txt",)), "train.freeze"),
    (dict(init_from="/nonexistent/run"), "train.init_from"),
    (dict(init_from_params="best"), "train.init_from_params"),
])
def test_bad_warm_start_config_fails_at_startup(tmp_path, train, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        Trainer(synthetic_config(**train), str(tmp_path), devices=jax.devices()[:1],
                train_iterator_fn=synthetic_iterator_fn())


def test_warm_start_from_a_run_saved_before_newer_model_fields(source_run, tmp_path):
    """A source whose config.json predates model fields (e.g. qkv_bias) loads with their
    defaults, as the README run of an older checkout does."""
    from tfusion.train.warm_start import read_source_params

    old = tmp_path / "old_run"
    shutil.copytree(source_run, old)
    saved = json.load(open(old / "config.json"))
    for field in ("qkv_bias", "rope_scaling"):
        saved["model"].pop(field)
    json.dump(saved, open(old / "config.json", "w"))
    from tfusion import sharding
    mesh_cfg = synthetic_config(steps=1).mesh
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:1])
    params, step, entry, _ = read_source_params(str(old), "ema", mesh,
                                                sharding.mesh_rules(mesh_cfg))
    expected = _flat(nnx_params(load_model(source_run, params="ema")[0]))
    got = {k: np.asarray(v) for k, v in flat_names(params).items()}
    assert step == 4 and entry == "ema_params" and sorted(got) == sorted(expected)
    for name, value in got.items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
