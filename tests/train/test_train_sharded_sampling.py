"""The trainer's sample grids and final evaluation run sharded on the training mesh
(params sharded over fsdp = all 8 devices), with no gather of the params; a run of
2 processes x 4 devices gives the same losses, grid and scores as 1 process x 8.

Run as a script it is one process of the 2-process run:
  python tests/train/test_train_sharded_sampling.py WORKDIR PROCESS_ID NUM_PROCESSES PORT
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:  # run as a script
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

PROMPTS = ("a large red square at the top left", "a small blue circle")


def _config():
    """shapes_tiny shrunk to seconds, params sharded 8 ways (fsdp), a grid at step 2
    and a final evaluation (text + shapes on 4 prompts, 2 diffusion steps)."""
    from experiments.registry import get_config

    c = get_config("shapes_tiny")
    c.model.update(width=32, depth=2, num_heads=2, patch_size=4, timestep_embed_dim=16)
    c.data.update(seq_len=64, max_images_per_row=2, eval_batches=1)
    c.diffusion.update(sample_steps=2)
    c.train.update(steps=2, batch_size=8, log_every=1, checkpoint_every=2, sample_every=2,
                   eval_every=0, sample_prompts=PROMPTS, final_eval_suite="shapes")
    c.optimizer.update(warmup_steps=5)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c


def _final_eval(config, workdir):
    from tfusion.eval.suites import EvalOptions, suite_evaluator
    from tfusion.inference.model_sampler import SamplingSettings

    options = EvalOptions(shapes_prompts=4, grid_images=4, progress=False,
                          sampling=SamplingSettings(batch_size=4, max_caption_tokens=8))
    text = suite_evaluator("text", config, workdir, options=options)
    shapes = suite_evaluator("shapes", config, workdir, options=options)
    return lambda step, params: {**text(step, params), **shapes(step, params)}


class _RowsOfOneStream:
    """This process's rows of the batches one process would read: the pipeline's data
    order depends on the process count, so 2 x 4 and 1 x 8 compare on the same data."""

    def __init__(self, config, *, process_index: int, process_count: int):
        from data_pipelines.pipeline import make_train_iterator

        self.it = make_train_iterator(config)
        self.rows = config.train.batch_size // process_count
        self.index = process_index

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        start = self.index * self.rows
        return {k: v[start:start + self.rows] for k, v in batch.items()}

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)

    def close(self):
        self.it.close()


def _trainer(workdir: str):
    from data_pipelines.tokenizer import build_tokenizer
    from tfusion.train.loop import Trainer

    config = _config()
    return Trainer(config, workdir, train_iterator_fn=_RowsOfOneStream,
                   tokenizer=build_tokenizer(config), final_eval=_final_eval(config, workdir))


def _process_main(workdir: str, process_id: int, num_processes: int, port: int) -> None:
    import jax

    from tfusion.train import distributed

    jax.config.update("jax_default_matmul_precision", "highest")
    distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
    result = _trainer(workdir).run()
    print("RESULT", process_id, json.dumps(
        {"step": result.step, "final_eval": result.last_metrics["final_eval"]}), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(workdir) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def _without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("seconds",) and not k.endswith("/seconds")}


@pytest.fixture(scope="module")
def single(tmp_path_factory, monkeypatch_module):
    """1 process x 8 devices; any gather of a params-sized tree fails the run."""
    import jax
    from jax.experimental import multihost_utils

    gather = multihost_utils.process_allgather

    def small_only(tree, *args, **kwargs):
        assert sum(np.size(x) for x in jax.tree.leaves(tree)) < 1000, "a large tree gathered"
        return gather(tree, *args, **kwargs)

    monkeypatch_module.setattr(multihost_utils, "process_allgather", small_only)
    workdir = str(tmp_path_factory.mktemp("single"))
    trainer = _trainer(workdir)
    result = trainer.run()
    return workdir, trainer, result


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_samples_and_final_eval_run_sharded_on_the_training_mesh(single):
    import jax
    from PIL import Image

    workdir, trainer, result = single
    assert jax.device_count() == 8 and result.step == 2
    # The sampling params stay sharded 8 ways over the training mesh.
    sharded = [x for x in jax.tree.leaves(trainer.state["ema_params"])
               if "fsdp" in str(x.sharding.spec)]
    assert sharded and all(len(x.sharding.device_set) == 8 for x in sharded)
    grid = os.path.join(workdir, "samples", "step_00000002.png")
    assert np.asarray(Image.open(grid)).ndim == 3
    final = result.last_metrics["final_eval"]
    assert np.isfinite(final["text/perplexity"]) and "shapes/generation/color" in final
    assert os.path.isfile(os.path.join(workdir, "eval", "shapes.json"))
    assert os.path.isfile(os.path.join(workdir, "eval", "shapes_generation_step2.png"))


@pytest.mark.slow
def test_two_processes_sample_and_evaluate_like_one(single, tmp_path):
    single_dir, _, single_result = single
    multi = str(tmp_path / "multi")
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), multi, str(i), "2",
                               str(port)], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=540)[0] for p in procs]
    results = []
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
        line = next(l for l in out.splitlines() if l.startswith(f"RESULT {i} "))
        results.append(json.loads(line.split(" ", 2)[2]))
    got, want = _losses(multi), _losses(single_dir)
    assert sorted(got) == [1, 2]
    np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=1e-5)
    # Every process computed the evaluation and got the same scores as one process.
    want_eval = _without_timing(single_result.last_metrics["final_eval"])
    for r in results:
        assert r["step"] == 2
        got_eval = _without_timing(r["final_eval"])
        assert got_eval.keys() == want_eval.keys()
        for key in want_eval:
            np.testing.assert_allclose(got_eval[key], want_eval[key], rtol=1e-4, atol=1e-6,
                                       err_msg=key)
    # The grid (written by the primary only) shows the same images.
    from PIL import Image
    name = os.path.join("samples", "step_00000002.png")
    a = np.asarray(Image.open(os.path.join(multi, name)), np.int32)
    b = np.asarray(Image.open(os.path.join(single_dir, name)), np.int32)
    assert np.abs(a - b).max() <= 1
    assert os.path.isfile(os.path.join(multi, "eval", "shapes.json"))


if __name__ == "__main__":
    _process_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
