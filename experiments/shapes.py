"""Tiny experiments on the built-in `shapes` data that run on a laptop CPU."""
from __future__ import annotations

from data_pipelines.config import shapes_tiny_data
from experiments.base import base_config


def shapes_tiny():
    """~3M-param Transfusion on 16 px shapes; learns visibly in ~10 min on 2 CPU cores."""
    c = base_config()
    c.name = "shapes_tiny"
    c.data = shapes_tiny_data()
    c.model.update(vocab_size=514, width=192, depth=4, num_heads=6, latent_height=16,
                   latent_width=16, latent_channels=3, patch_size=2,
                   timestep_embed_dim=64, dtype="float32", scan_layers=False)
    # Held-out loss (data.eval_batches batches) at every checkpoint: a few seconds.
    c.train.update(steps=1200, batch_size=8, log_every=25, checkpoint_every=300, sample_every=600,
                   eval_every=300, keep_checkpoints=2)
    c.optimizer.update(learning_rate=2e-3, warmup_steps=100, final_learning_rate=1e-4,
                       weight_decay=0.1)
    return c
