"""The Chameleon-style baseline: LM loss on image tokens, z-loss and QK-norm by reference."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import chameleon, registry
from tfusion import attention, losses
from tfusion.config import ModelConfig
from tfusion.model.transformer import BlockContext, SelfAttention
from tfusion.model.layers import apply_rope, rope_angles
from tfusion.model.transfusion import Transfusion
from tfusion.train.step import Objective

from tests.helpers.numpy_reference import numpy_text_nll
from tests.helpers.packed_batches import random_batch, tiny_config

BOI, EOI = 512, 513  # builtin tokenizer: 512 pieces, then BOI/EOI
L = 32


def discrete_batch(cfg):
    """One document: 3 text ids, BOI, 16 VQ ids (offset past the text vocab), EOI, 2 text ids."""
    codes = np.arange(cfg.model.image_tokens) * 7 % cfg.model.codebook_size
    doc = [5, 9, 12, BOI, *(chameleon.image_token_offset(cfg.model) + codes), EOI, 7, 8]
    tokens = np.zeros((1, L), np.int32)
    tokens[0, :len(doc)] = doc
    seg = (np.arange(L) < len(doc)).astype(np.int32)[None]
    latent = (cfg.model.latent_height, cfg.model.latent_width, cfg.model.latent_channels)
    return dict(tokens=jnp.asarray(tokens), segment_ids=jnp.asarray(seg),
                positions=jnp.asarray(np.arange(L, dtype=np.int32)[None] * seg),
                image_index=jnp.full((1, L), -1, jnp.int32),
                images=jnp.zeros((1, 0, *latent)), image_mask=jnp.zeros((1, 0), bool),
                image_start=jnp.zeros((1, 0), jnp.int32),
                image_t_max=jnp.zeros((1, 0), jnp.int32)), len(doc)


def test_config_is_discrete_with_qk_norm_and_z_loss():
    cfg = registry.get_config("chameleon_0.16B")
    assert cfg.model.image_representation == "discrete"
    assert cfg.model.vocab_size == 32_002 + 16_384 and cfg.model.image_tokens == 1024
    assert cfg.model.qk_norm and cfg.loss.z_loss_weight == 1e-5
    assert cfg.data.max_images_per_row == 0
    assert not registry.get_config("transfusion_0.16B").model.qk_norm


def test_image_tokens_get_lm_loss_and_no_diffusion():
    cfg = registry.get_config("micro_chameleon_w64")
    batch, n = discrete_batch(cfg)
    model = Transfusion(cfg.model, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    objective = Objective(graphdef, cfg)
    loss, aux = objective.loss(params, batch, jax.random.key(0))
    assert float(aux["sums"]["ddpm_count"]) == 0 and float(aux["loss_diffusion"]) == 0
    # Every next-token pair of the document is a target, image tokens and EOI included.
    assert float(aux["sums"]["lm_count"]) == n - 1
    logits, _ = model(batch, batch["images"], jnp.zeros((1, 0), jnp.int32))
    logits = np.asarray(logits[0, :n - 1], np.float64)
    targets = np.asarray(batch["tokens"][0, 1:n])
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = log_z - logits[np.arange(n - 1), targets]
    reference = np.mean(nll + cfg.loss.z_loss_weight * log_z ** 2)
    np.testing.assert_allclose(float(loss), reference, rtol=1e-5)
    assert targets[3:3 + cfg.model.image_tokens].min() >= chameleon.image_token_offset(cfg.model)


def test_z_loss_matches_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 11)).astype(np.float32) * 3
    tokens = rng.integers(0, 11, size=(2, 6)).astype(np.int32)
    weights = (rng.random((2, 6)) < 0.7).astype(np.float32)
    weights[:, -1] = 0
    w = 1e-2
    nll, log_z = losses.next_token_nll(jnp.asarray(logits), jnp.asarray(tokens))
    got, count = losses.lm_loss_sums(nll, log_z, jnp.asarray(weights), w)
    x = logits.astype(np.float64)
    log_z = np.log(np.exp(x).sum(-1))
    targets = np.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    nll = log_z - np.take_along_axis(x, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(got), np.sum((nll + w * log_z ** 2) * weights), rtol=1e-5)
    base, _ = losses.lm_loss_sums(nll, log_z, jnp.asarray(weights))
    np.testing.assert_allclose(float(got - base), w * np.sum(log_z ** 2 * weights), rtol=1e-4)


def _rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def test_qk_norm_is_rmsnorm_of_q_and_k():
    cfg = ModelConfig.of(registry.get_config("micro_chameleon_w64").model)
    attn = SelfAttention(cfg, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(1)
    attn.q_norm.scale[...] = jnp.asarray(rng.uniform(0.5, 2.0, attn.head_dim), jnp.float32)
    attn.k_norm.scale[...] = jnp.asarray(rng.uniform(0.5, 2.0, attn.head_dim), jnp.float32)
    x = jnp.asarray(rng.normal(size=(1, 10, cfg.width)), jnp.float32)
    seg, pos = jnp.ones((1, 10), jnp.int32), jnp.arange(10, dtype=jnp.int32)[None]
    sin, cos = rope_angles(pos, attn.head_dim, cfg.rope_theta)
    mask = attention.MaskInfo.from_batch(seg, jnp.full((1, 10), -1, jnp.int32), 4)
    got, _ = attn(x, BlockContext(sin=sin, cos=cos, mask=mask))

    qkv = np.asarray(attn.qkv(x), np.float64)  # [B, L, Hkv, G + 2, Dh]
    q = qkv[:, :, :, :attn.group].reshape(1, 10, attn.num_heads, attn.head_dim)
    k, v = qkv[:, :, :, attn.group], qkv[:, :, :, attn.group + 1]
    q = _rms_norm(q, np.asarray(attn.q_norm.scale[...]), cfg.norm_eps)
    k = _rms_norm(k, np.asarray(attn.k_norm.scale[...]), cfg.norm_eps)
    q = np.asarray(apply_rope(jnp.asarray(q, jnp.float32), sin, cos), np.float64)
    k = np.asarray(apply_rope(jnp.asarray(k, jnp.float32), sin, cos), np.float64)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(attn.head_dim)
    scores = np.where(np.tril(np.ones((10, 10), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(1, 10, -1)
    want = np.asarray(attn.out(jnp.asarray(out, jnp.float32)))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
    # Without the norms (same weights) the output differs: the norm is really applied.
    attn.q_norm = attn.k_norm = None
    plain, _ = attn(x, BlockContext(sin=sin, cos=cos, mask=mask))
    assert not np.allclose(np.asarray(plain), want, atol=1e-3)


def test_text_and_image_code_losses_split_the_lm_loss_by_pair_kind():
    cfg = registry.get_config("micro_chameleon_w64")
    batch, n = discrete_batch(cfg)
    model = Transfusion(cfg.model, rngs=nnx.Rngs(2))
    graphdef, params = nnx.split(model)
    _, aux = Objective(graphdef, cfg).loss(params, batch, jax.random.key(0))
    logits, _ = model(batch, batch["images"], jnp.zeros((1, 0), jnp.int32))
    x = np.asarray(logits[0], np.float64)
    tokens = np.asarray(batch["tokens"][0])
    offset = chameleon.image_token_offset(cfg.model)
    text, image = [], []
    for i in range(n - 1):  # brute force over the document's next-token pairs
        nll = np.log(np.exp(x[i] - x[i].max()).sum()) + x[i].max() - x[i, tokens[i + 1]]
        both_text = tokens[i] < offset and tokens[i + 1] < offset
        (text if both_text else image).append(nll)
    assert len(text) == 5 and len(image) == cfg.model.image_tokens + 1  # BOI->c0 .. c15->EOI
    np.testing.assert_allclose(float(aux["loss_text"]), np.mean(text), rtol=1e-5)
    np.testing.assert_allclose(float(aux["loss_image_tokens"]), np.mean(image), rtol=1e-5)


def test_transfusion_text_loss_is_plain_nll_of_text_pairs_without_z_loss():
    cfg = tiny_config()
    batch, _, spec = random_batch(0, cfg.model, batch_size=2, seq_len=48)
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(*batch["tokens"].shape, cfg.model.vocab_size)).astype(np.float32) * 2
    eps = jnp.zeros(batch["images"].shape)
    z = 1e-2  # loss_lm carries the z-loss, loss_text must not
    sums = losses.transfusion_sums(jnp.asarray(logits), eps, eps, batch, z_loss_weight=z)
    values = losses.combine(sums, 1.0)
    assert "loss_image_tokens" not in values
    plain, count = numpy_text_nll(logits, batch)
    with_z, _ = numpy_text_nll(logits, batch, z)
    np.testing.assert_allclose(float(values["loss_text"]), plain / count, rtol=1e-5)
    np.testing.assert_allclose(float(values["loss_lm"]), with_z / count, rtol=1e-5)
