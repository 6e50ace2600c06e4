"""Shared pieces of the inference tests: tiny models and full-forward references."""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests.helpers.packed_batches import tiny_config
from tfusion.batch import BatchSpec, ImageSegment, assemble_rows, document_images, document_length
from tfusion.inference.engine import Engine
from tfusion.inference.options import SpecialTokens
from tfusion.model.transfusion import Transfusion

TOL = 2e-5
SPECIAL = SpecialTokens(pad=0, bos=1, eos=2, boi=3, eoi=4)


class BOIBiased(Transfusion):
    """A random model that likes starting images, so generation tests make some."""

    def logits(self, hidden):
        return super().logits(hidden).at[..., SPECIAL.boi].add(8.0)


@functools.lru_cache(maxsize=None)
def shared_engine():
    """One default tiny model for all inference tests (init and compiles are shared)."""
    return tiny_engine(model_class=BOIBiased)


def tiny_engine(seed=0, model_class=Transfusion, **model_overrides):
    config = tiny_config(**model_overrides)
    model = model_class(config.model, rngs=nnx.Rngs(seed))
    # The linear decoder is zero-initialised (eps = 0); give it weights so eps
    # comparisons are not trivially equal.
    if config.model.modality_layer == "linear":
        proj = model.image_decoder.proj
        proj.kernel[...] = 0.3 * np.random.default_rng(seed).normal(size=proj.kernel.shape)
    return Engine(model, config.diffusion), model, config


def full_forward(model, doc, t_value=0):
    """Logits [L, V] and eps [M, H, W, C] of one document run alone, images at t."""
    cfg = model.cfg
    shape = (cfg.latent_height, cfg.latent_width, cfg.latent_channels)
    spec = BatchSpec(1, 1, 0, shape, cfg.patch_size)
    p = spec.patches_per_image
    spec = BatchSpec(1, document_length(doc, p), max(document_images(doc), 1), shape,
                     cfg.patch_size)
    batch = {k: jnp.asarray(v) for k, v in assemble_rows([[doc]], spec, cfg.pad_id).items()}
    t = jnp.full(batch["image_mask"].shape, t_value, jnp.int32)
    logits, eps = model(batch, batch["images"], t)
    return np.asarray(logits[0]), np.asarray(eps[0])


def random_tokens(rng, n, vocab):
    return rng.integers(5, vocab, n).astype(np.int32)


def random_image(rng, cfg):
    shape = (cfg.latent_height, cfg.latent_width, cfg.latent_channels)
    return ImageSegment(rng.normal(size=shape).astype(np.float32), 0)
