"""load_model reads the params only (never the optimizer state), straight into the
shardings of the run's mesh and rule table; launch.export writes params-only copies
(orbax: a run directory load_model reads; safetensors: flat dotted names)."""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from tests.helpers.train_fixtures import synthetic_config, synthetic_iterator_fn
from tfusion import sharding
from tfusion.config import ConfigError
from tfusion.eval.checkpoints import load_model, override_attention_kernel
from tfusion.eval.export import SAFETENSORS_FILE, ExportExistsError, export, flat_names
from tfusion.train import state as state_lib
from tfusion.train.checkpoint import Checkpointer
from tfusion.train.loop import Trainer


def _config():
    config = synthetic_config(steps=2, ema_decay=0.9)
    config.mesh.update(data=2, fsdp=2, tensor=2)
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    trainer = Trainer(_config(), workdir, train_iterator_fn=synthetic_iterator_fn())
    trainer.run()
    host = lambda tree: jax.tree.map(np.asarray, tree)
    return workdir, host(trainer.state["params"]), host(trainer.state["ema_params"])


def _pure(model):
    return state_lib.to_pure(nnx.split(model)[1])


def _assert_same(tree, want):
    got = jax.tree.leaves(tree)
    assert len(got) == len(jax.tree.leaves(want))
    for a, b in zip(got, jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_load_model_restores_only_the_params_sharded_by_the_rule_table(run, monkeypatch):
    workdir, _, ema = run
    asked = []
    partial = ocp.args.PyTreeRestore

    def spy(*args, **kwargs):
        asked.append(kwargs)
        return partial(*args, **kwargs)

    def no_full_restore(*args, **kwargs):
        raise AssertionError("the whole train state was restored")

    monkeypatch.setattr(ocp.args, "PyTreeRestore", spy)
    monkeypatch.setattr(ocp.args, "StandardRestore", no_full_restore)
    model, config, step = load_model(workdir, config=_config())
    assert step == 2
    # One partial restore, given the EMA sub-tree only: no optimizer state is read.
    assert len(asked) == 1 and asked[0]["partial_restore"]
    assert list(asked[0]["item"]) == ["ema_params"]
    _assert_same(_pure(model), ema)
    # Sharded on the run's mesh (8 devices: data 2, fsdp 2, tensor 2) as the table says.
    mesh = sharding.make_mesh(config.mesh)
    want = state_lib.abstract_params(config.model, mesh, sharding.mesh_rules(config.mesh))
    leaves = jax.tree.leaves(_pure(model))
    for got, target in zip(leaves, jax.tree.leaves(want)):
        assert got.sharding.is_equivalent_to(target.sharding, got.ndim)
        assert dict(got.sharding.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    specs = {str(x.sharding.spec) for x in leaves}
    assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs), specs


def test_load_model_raw_params(run):
    workdir, raw, _ = run
    model, _, _ = load_model(workdir, config=_config(), params="raw")
    _assert_same(_pure(model), raw)


def test_orbax_export_round_trips_through_load_model(run, tmp_path):
    workdir, raw, ema = run
    out = str(tmp_path / "export")
    info = export(workdir, out, params="ema")
    assert info["params"] == "ema" and info["step"] == 2
    # Only the params are in the exported checkpoint: no optimizer state, no data.
    checkpointer = Checkpointer(os.path.join(out, "checkpoints"), keep=1, async_save=False)
    assert checkpointer.all_steps() == [2]
    assert checkpointer.saved_entries(2) == ["params"]
    checkpointer.close()
    assert sorted(os.listdir(os.path.join(out, "checkpoints", "2"))) == \
        sorted(["state", "_CHECKPOINT_METADATA"] +
               [f for f in os.listdir(os.path.join(out, "checkpoints", "2"))
                if f.startswith("commit_success")])
    # OUT is a run directory for load_model (launch.generate / launch.evaluate).
    model, _, step = load_model(out)
    assert step == 2
    _assert_same(_pure(model), ema)
    with open(os.path.join(out, "export.json")) as f:
        assert json.load(f)["params"] == "ema"
    with pytest.raises(ExportExistsError):
        export(workdir, out)


def test_safetensors_export_holds_flat_named_params_only(run, tmp_path):
    from safetensors import safe_open

    workdir, raw, _ = run
    out = str(tmp_path / "st")
    info = export(workdir, out, params="raw", fmt="safetensors")
    assert info["params"] == "raw"
    want = flat_names(raw)
    with safe_open(os.path.join(out, SAFETENSORS_FILE), framework="numpy") as f:
        names = sorted(f.keys())
        assert names == sorted(want)
        assert f.metadata()["params"] == "raw"
        for name in names:
            value = f.get_tensor(name)
            assert value.shape == want[name].shape
            np.testing.assert_array_equal(value, want[name])
    assert "backbone.blocks.attn.qkv.kernel" in names
    assert not any(n.startswith(("opt_state", "ema_params", "mu", "nu")) or ".mu." in n
                   for n in names)


def test_attention_kernel_override():
    config = _config()
    override_attention_kernel(config, None)
    assert config.model.attention_kernel == "xla"
    override_attention_kernel(config, "flash")
    assert config.model.attention_kernel == "flash"
    with pytest.raises(ConfigError, match="model.attention_kernel"):
        override_attention_kernel(config, "nope")


def test_a_run_saved_before_vocab_padding_loads_unpadded(tmp_path):
    """config.json written before model.padded_vocab_size existed: its embedding and LM
    head have vocab_size rows, so the loaded config says exactly that."""
    import json

    from tfusion.eval.checkpoints import load_config

    (tmp_path / "config.json").write_text(json.dumps({"model": {"vocab_size": 300}}))
    assert load_config(str(tmp_path)).model.padded_vocab_size == 300
    (tmp_path / "config.json").write_text(json.dumps(
        {"model": {"vocab_size": 300, "padded_vocab_size": 384}}))
    assert load_config(str(tmp_path)).model.padded_vocab_size == 384


def test_a_run_saved_before_a_model_field_existed_loads_with_its_old_behaviour(tmp_path):
    """A config.json from before model.modality_weights / untied_* existed (every model
    field but those): it loads, validates and builds the model it was trained as."""
    import json

    from tfusion.config import ModelConfig, model_config
    from tfusion.eval.checkpoints import load_config

    saved = model_config().to_dict()
    for field in ("modality_weights", "untied_init", "untied_tile", "untied_unroll"):
        del saved[field]
    saved.update(width=48, vocab_size=300)
    (tmp_path / "config.json").write_text(json.dumps({"model": saved, "train": {"steps": 3}}))
    config = load_config(str(tmp_path))
    model = ModelConfig.of(config.model)
    assert model.modality_weights == "shared" and model.width == 48
    assert config.train.steps == 3
