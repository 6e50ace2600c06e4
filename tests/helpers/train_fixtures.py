"""Shared pieces of the tests/train/ files: tiny configs, a synthetic data
iterator whose global batch depends only on (seed, step), and a 2-process driver.

Run as a script it is one process of a multi-process run (tests/train/test_train_multiprocess.py):
  python tests/helpers/train_fixtures.py WORKDIR PROCESS_ID NUM_PROCESSES PORT
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

# Run as a script, `tests` must be importable: the root is three levels up.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

# CLI overrides that shrink experiments/registry.py:shapes_tiny to a seconds-long run
# through the real data pipeline (16 patches per image at patch 4, 64-token rows).
TINY_CLI_OVERRIDES = (
    "--config.model.width=32", "--config.model.depth=2", "--config.model.num_heads=2",
    "--config.model.patch_size=4", "--config.model.timestep_embed_dim=16",
    "--config.data.seq_len=64", "--config.data.max_images_per_row=2",
    "--config.train.batch_size=4", "--config.optimizer.warmup_steps=5",
    "--config.train.final_eval_suite=",
)


def synthetic_config(steps: int = 6, batch_size: int = 8, **train):
    """A full experiment config with a tiny model, for the synthetic iterator."""
    from experiments.base import base_config
    from tests.helpers.packed_batches import tiny_model_config

    c = base_config()
    c.model = tiny_model_config(width=64, num_heads=4, mlp_hidden=128, vocab_size=64)
    c.data.seq_len = 32
    c.data.max_images_per_row = 2
    c.train.update(steps=steps, batch_size=batch_size, log_every=1, checkpoint_every=2,
                   seed=0, peak_flops_per_device=1e9, **train)
    c.optimizer.update(learning_rate=1e-2, warmup_steps=2, final_learning_rate=1e-3)
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    return c


class SyntheticIterator:
    """Global batch of step s = random_batch(seed * 1000 + s); process p yields its rows.

    `nan_steps`: steps whose batch has NaN images (non-finite loss injection).
    """

    def __init__(self, config, *, process_index=0, process_count=1, nan_steps=()):
        self.config, self.index, self.count = config, process_index, process_count
        self.nan_steps = set(nan_steps)
        self.step = 0

    def __next__(self):
        from tests.helpers.packed_batches import random_batch

        c = self.config
        batch, _, _ = random_batch(c.train.seed * 1000 + self.step, c.model,
                                   batch_size=c.train.batch_size, seq_len=c.data.seq_len,
                                   max_images=c.data.max_images_per_row, as_jax=False)
        if self.step in self.nan_steps:
            batch["images"] = np.full_like(batch["images"], np.nan)
        self.step += 1
        rows = c.train.batch_size // self.count
        return {k: v[self.index * rows:(self.index + 1) * rows] for k, v in batch.items()}

    def get_state(self):
        return {"step": self.step}

    def set_state(self, state):
        self.step = int(state["step"])


def synthetic_iterator_fn(nan_steps=()):
    def make(config, *, process_index, process_count):
        return SyntheticIterator(config, process_index=process_index,
                                 process_count=process_count, nan_steps=nan_steps)
    return make


def synthetic_eval_iterator_fn(num_batches: int = 2):
    """Held-out stand-in: the same `num_batches` batches (seeded apart) on every call."""
    def make(config, *, process_index, process_count):
        it = SyntheticIterator(config, process_index=process_index, process_count=process_count)
        it.step = 10_000
        return (next(it) for _ in range(num_batches))
    return make


def read_losses(workdir: str, split: str = "train") -> dict[int, float]:
    """step -> loss of the `split` rows of workdir/metrics.jsonl."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row["split"] == split:
                out[row["step"]] = row["loss"]
    return out


def _process_main(workdir: str, process_id: int, num_processes: int, port: int) -> None:
    import jax

    from tfusion.train import distributed
    from tfusion.train.loop import train

    jax.config.update("jax_default_matmul_precision", "highest")
    distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
    result = train(synthetic_config(steps=4), workdir, train_iterator_fn=synthetic_iterator_fn())
    print("RESULT", process_id, result.step, result.stopped, flush=True)


if __name__ == "__main__":
    _process_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
