"""Causality and packing invariance of the full Transfusion forward pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers.packed_batches import random_document, tiny_model_config
from tfusion.batch import BatchSpec, ImageSegment, assemble_rows
from tfusion.model.transfusion import Transfusion

TOL = 1e-5  # float32 with highest matmul precision (tests/conftest.py)


def _forward(model, batch, t_value=300):
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    t = jnp.full(batch["image_mask"].shape, t_value, jnp.int32)
    return jax.tree.map(np.asarray, model(batch, batch["images"], t))


def _two_doc_batch(cfg, rng):
    shape = (cfg.latent_height, cfg.latent_width, cfg.latent_channels)
    img = lambda: ImageSegment(rng.normal(size=shape).astype(np.float32), 999)
    tok = lambda n: rng.integers(5, cfg.vocab_size, n).astype(np.int32)
    doc1 = [tok(3), img(), tok(3)]
    doc2 = [tok(2), img(), tok(2)]
    spec = BatchSpec(1, 24, 2, shape, cfg.patch_size)
    return assemble_rows([[doc1, doc2]], spec, cfg.pad_id), spec


@pytest.mark.parametrize("modality_layer", ["linear", pytest.param("unet", marks=pytest.mark.slow)])
def test_text_causality(modality_layer):
    cfg = tiny_model_config(modality_layer=modality_layer, unet_channels=(32, 32))
    model = Transfusion(cfg, rngs=nnx.Rngs(0))
    batch, spec = _two_doc_batch(cfg, np.random.default_rng(0))
    logits, eps = _forward(model, batch)
    # Last text token of document 1 (just before document 2 starts).
    i = int(np.flatnonzero(batch["segment_ids"][0] == 1)[-1])
    changed = dict(batch, tokens=batch["tokens"].copy())
    changed["tokens"][0, i] = (changed["tokens"][0, i] + 1) % cfg.vocab_size
    logits2, eps2 = _forward(model, changed)
    np.testing.assert_allclose(logits2[0, :i], logits[0, :i], atol=TOL)
    np.testing.assert_allclose(eps2[0, 0], eps[0, 0], atol=TOL)  # image before i
    assert np.abs(logits2[0, i] - logits[0, i]).max() > 1e-4
    # Document 2 never sees document 1 (padding outputs are unconstrained).
    doc2 = batch["segment_ids"][0] == 2
    np.testing.assert_allclose(logits2[0, doc2], logits[0, doc2], atol=TOL)
    np.testing.assert_allclose(eps2[0, 1], eps[0, 1], atol=TOL)


@pytest.mark.parametrize("modality_layer", ["linear", "unet"])
def test_one_patch_reaches_its_whole_image_only(modality_layer):
    cfg = tiny_model_config(modality_layer=modality_layer, unet_channels=(32, 32))
    model = Transfusion(cfg, rngs=nnx.Rngs(1))
    batch, spec = _two_doc_batch(cfg, np.random.default_rng(1))
    logits, eps = _forward(model, batch)
    changed = dict(batch, images=batch["images"].copy())
    # Bottom-right latent pixel: belongs to the last patch of image 0 only.
    changed["images"][0, 0, -1, -1, :] += 1.0
    logits2, eps2 = _forward(model, changed)
    start, p = int(batch["image_start"][0, 0]), spec.patches_per_image
    diff = np.abs(logits2[0] - logits[0]).max(axis=-1)
    assert (diff[start:start + p] > 1e-5).all(), diff[start:start + p]
    np.testing.assert_allclose(logits2[0, :start], logits[0, :start], atol=TOL)
    doc2 = batch["segment_ids"][0] == 2
    np.testing.assert_allclose(logits2[0, doc2], logits[0, doc2], atol=TOL)
    np.testing.assert_allclose(eps2[0, 1], eps[0, 1], atol=TOL)


@pytest.mark.parametrize("modality_layer", ["linear", "unet"])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_packing_invariance(modality_layer, scan_layers):
    """A document's logits and eps are the same packed behind others or alone."""
    cfg = tiny_model_config(modality_layer=modality_layer, unet_channels=(32, 32),
                            scan_layers=scan_layers)
    model = Transfusion(cfg, rngs=nnx.Rngs(2))
    rng = np.random.default_rng(2)
    shape = (cfg.latent_height, cfg.latent_width, cfg.latent_channels)
    target = [rng.integers(5, 60, 3).astype(np.int32),
              ImageSegment(rng.normal(size=shape).astype(np.float32), 999),
              rng.integers(5, 60, 2).astype(np.int32)]
    others = [random_document(rng, cfg, 1) for _ in range(2)]
    spec = BatchSpec(2, 40, 3, shape, cfg.patch_size)
    batch = assemble_rows([others + [target], [target]], spec, cfg.pad_id)
    logits, eps = _forward(model, batch)
    packed_rows = batch["segment_ids"][0] == 3
    alone_rows = batch["segment_ids"][1] == 1
    np.testing.assert_allclose(logits[0, packed_rows], logits[1, alone_rows], atol=TOL)
    packed_slot = int(batch["image_mask"][0].sum()) - 1
    np.testing.assert_allclose(eps[0, packed_slot], eps[1, 0], atol=TOL)
