"""The training loop in-process: sharded vs single-device, restore into another mesh,
non-finite skipping and stopping. Synthetic data: batch s depends only on (seed, s)."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from tests.helpers.train_fixtures import (read_losses, synthetic_config, synthetic_eval_iterator_fn,
                                  synthetic_iterator_fn)
from tfusion.train.loop import NonFiniteError, Trainer

# Sharded runs reorder float32 reductions; after 6 Adam steps losses agree to ~1e-6
# relative in practice. We allow 1e-4 (loss) and 1e-3 / 1e-5 abs (params).
LOSS_RTOL = 1e-4


def _trainer(workdir, mesh=None, devices=None, nan_steps=(), **train):
    config = synthetic_config(**train)
    if mesh:
        config.mesh.update(mesh)
    return Trainer(config, str(workdir), devices=devices,
                   train_iterator_fn=synthetic_iterator_fn(nan_steps),
                   eval_iterator_fn=synthetic_eval_iterator_fn())


def _params(trainer):
    return [np.asarray(x) for x in jax.tree.leaves(trainer.state["params"])]


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("single")
    trainer = _trainer(workdir, devices=jax.devices()[:1])
    trainer.run()
    return read_losses(str(workdir)), _params(trainer)


def test_sharded_run_matches_single_device_and_restores_into_other_mesh(
        single_device_run, tmp_path):
    ref_losses, ref_params = single_device_run
    trainer = _trainer(tmp_path, mesh=dict(data=2, fsdp=2, tensor=2))
    result = trainer.run()
    assert result.step == 6 and result.stopped == "done"
    losses = read_losses(str(tmp_path))
    assert sorted(losses) == list(range(1, 7))
    np.testing.assert_allclose([losses[s] for s in range(1, 7)],
                               [ref_losses[s] for s in range(1, 7)], rtol=LOSS_RTOL)
    for a, b in zip(_params(trainer), ref_params):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)

    # Resume step 4 (drop 6) on a different mesh: fsdp x tensor instead of data x fsdp x tensor.
    shutil.rmtree(os.path.join(tmp_path, "checkpoints", "6"))
    other = _trainer(tmp_path, mesh=dict(data=1, fsdp=4, tensor=2))
    result = other.run()
    assert result.step == 6
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(other.state["params"])}
    assert any("tensor" in s and "fsdp" in s for s in specs), specs
    losses = read_losses(str(tmp_path))
    np.testing.assert_allclose([losses[5], losses[6]], [ref_losses[5], ref_losses[6]],
                               rtol=LOSS_RTOL)
    for a, b in zip(_params(other), ref_params):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_eval_logs_heldout_loss(tmp_path):
    _trainer(tmp_path, devices=jax.devices()[:1], steps=2, eval_every=1).run()
    evals = read_losses(str(tmp_path), split="eval")
    assert sorted(evals) == [1, 2] and all(np.isfinite(v) for v in evals.values())
    assert evals[2] != evals[1]  # same held-out batches and noise, updated params


def test_final_eval_is_the_callable_given_and_its_metrics_are_logged(tmp_path):
    """The Trainer builds no data or evaluators: train.final_eval_suite runs the
    `final_eval` it was handed (launch/train_setup.py builds the suite's) on the final
    params, and logs what it returns as split "final_eval"."""
    calls = []

    def final_eval(step, params):
        calls.append((step, [np.asarray(x) for x in jax.tree.leaves(params)]))
        return {"text/perplexity": 12.5}

    config = synthetic_config(steps=2, final_eval_suite="text")
    trainer = Trainer(config, str(tmp_path), devices=jax.devices()[:1],
                      train_iterator_fn=synthetic_iterator_fn(), final_eval=final_eval)
    result = trainer.run()
    assert [step for step, _ in calls] == [2]
    for a, b in zip(calls[0][1], _params(trainer)):
        np.testing.assert_array_equal(a, b)
    assert result.last_metrics["final_eval"]["text/perplexity"] == 12.5
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    final = [r for r in rows if r["split"] == "final_eval"]
    assert len(final) == 1 and final[0]["step"] == 2
    assert final[0]["text/perplexity"] == 12.5 and final[0]["seconds"] >= 0


@pytest.mark.parametrize("fields, argument", [({"eval_every": 2}, "eval_iterator_fn"),
                                              ({"sample_every": 2}, "tokenizer"),
                                              ({"final_eval_suite": "text"}, "final_eval")])
def test_trainer_refuses_outputs_it_was_given_nothing_for(tmp_path, fields, argument):
    field = next(iter(fields))
    with pytest.raises(ValueError, match=rf"^train\.{field}=.* needs the Trainer's {argument} "):
        Trainer(synthetic_config(**fields), str(tmp_path), devices=jax.devices()[:1],
                train_iterator_fn=synthetic_iterator_fn())


def test_nan_batch_is_skipped_and_counted(tmp_path):
    result = _trainer(tmp_path, devices=jax.devices()[:1], nan_steps={2}, steps=4).run()
    assert result.stopped == "done" and result.last_metrics["skipped_total"] == 1
    losses = read_losses(str(tmp_path))
    assert np.isnan(losses[3]) and np.isfinite(losses[4])


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path):
    trainer = _trainer(tmp_path, devices=jax.devices()[:1], nan_steps=set(range(4, 20)),
                       steps=12, max_nonfinite_steps=3)
    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row.*step 4"):
        trainer.run()
    # Step 4 is the last checkpoint before the bad batches: kept, and nothing after it.
    assert trainer.checkpointer.all_steps()[-1] == 4


def test_saving_a_step_twice_is_a_no_op(tmp_path):
    # SIGTERM right after a periodic save asks for the same step again.
    from tfusion.train.checkpoint import Checkpointer

    ckpt = Checkpointer(str(tmp_path), keep=2)
    state = {"x": jax.numpy.arange(3.0)}
    ckpt.save(3, state, [{"i": 1}])
    ckpt.save(3, state, [{"i": 1}])
    ckpt.close()
    assert Checkpointer(str(tmp_path), keep=2).all_steps() == [3]


@pytest.mark.slow
def test_ema_run_resumes_exactly_and_loading_uses_the_ema_by_default(tmp_path):
    """An EMA run resumed from step 4 ends with the same params and EMA, bit for bit, as
    the uninterrupted run; load_model (launch.generate / launch.evaluate) takes the EMA
    unless asked for params="raw"; eval metrics carry the denoising diagnostics."""
    from tfusion.eval.checkpoints import load_model
    ref = _trainer(tmp_path / "ref", devices=jax.devices()[:1], ema_decay=0.9, eval_every=6)
    ref.run()
    ema = [np.asarray(x) for x in jax.tree.leaves(ref.state["ema_params"])]
    assert any(np.abs(a - b).max() > 0 for a, b in zip(ema, _params(ref)))
    rows = [r for r in map(__import__("json").loads, open(tmp_path / "ref" / "metrics.jsonl"))
            if r["split"] == "eval"]
    assert rows and 0 < rows[-1]["denoise_skill/f0.95"] and "image_caption_gap" in rows[-1]

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ref", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "6")
    resumed = _trainer(resumed_dir, devices=jax.devices()[:1], ema_decay=0.9, eval_every=6)
    resumed.run()
    for a, b in zip(jax.tree.leaves((resumed.state["params"], resumed.state["ema_params"])),
                    jax.tree.leaves((ref.state["params"], ref.state["ema_params"]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    config = synthetic_config(ema_decay=0.9)
    model, _, step = load_model(str(tmp_path / "ref"), config=config)
    from flax import nnx
    loaded = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    assert step == 6
    for a, b in zip(loaded, ema):
        np.testing.assert_array_equal(a, b)
    raw, _, _ = load_model(str(tmp_path / "ref"), config=synthetic_config(ema_decay=0.9),
                           params="raw")
    for a, b in zip(jax.tree.leaves(nnx.state(raw, nnx.Param)), _params(ref)):
        np.testing.assert_array_equal(np.asarray(a), b)
