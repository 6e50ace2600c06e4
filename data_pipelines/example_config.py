"""A complete tiny experiment config for the data pipeline alone (tests, inspect CLI).

experiments/registry.py owns real experiment configs; this one exists so the
pipeline can be run and tested before/without it:
  python -m data_pipelines.inspect --config=data_pipelines/example_config.py
"""
from __future__ import annotations

import ml_collections

from data_pipelines.config import shapes_tiny_data
from tfusion.config import diffusion_config, model_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.model = model_config()
    c.model.latent_height = c.model.latent_width = 16  # shapes 16 px, identity encoder
    c.model.latent_channels = 3
    c.model.patch_size = 2  # 64 patches per image
    c.model.vocab_size = 512  # builtin tokenizer (BOI/EOI included) fits
    c.diffusion = diffusion_config()
    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 8
    c.train.seed = 0
    c.data = shapes_tiny_data()
    return c
