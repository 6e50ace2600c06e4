"""Tiny experiments on the built-in `shapes` data that run on a laptop CPU."""
from __future__ import annotations

from data_pipelines.config import data_config, shapes_tiny_data
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


def digits_tiny():
    """The same tiny model on scikit-learn's bundled handwritten digits (8x8 grey, 1797
    images; captions "a handwritten digit seven"); the digits suite scores it."""
    c = shapes_tiny()
    c.name = "digits_tiny"
    c.data = data_config()
    c.data.update(source="digits", image_size=8, seq_len=128, max_images_per_row=6,
                  tokenizer_vocab_size=512, eval_examples=256)
    c.model.update(latent_height=8, latent_width=8)
    c.train.update(final_eval_suite="digits", sample_prompts=tuple(
        f"a handwritten digit {w}" for w in ("zero", "three", "seven", "eight")))
    return c
