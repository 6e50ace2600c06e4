"""Sharding that holds at scale (issue 30): the padded vocabulary, indivisible axes as
errors, U-Net params over fsdp, and the paper configs on their natural topologies."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from tests.helpers.packed_batches import random_batch, tiny_config, tiny_model_config
from tfusion import losses, sharding
from tfusion.config import ConfigError, DiffusionConfig, ModelConfig, diffusion_config
from tfusion.inference.token_sampling import sample_tokens
from tfusion.model.transfusion import PAD_LOGIT, Transfusion
from tfusion.train.params import abstract_model, init_params
from tfusion.train.workdir import check_resume_config


def _array(x):
    return x.value if hasattr(x, "value") else x


# --- padded vocabulary ---

def test_padded_vocab_size_rounds_to_128():
    assert ModelConfig().padded_vocab_size == 32_128  # Llama 2 + BOI/EOI: 32002
    assert ModelConfig.of(tiny_model_config(vocab_size=64)).padded_vocab_size == 128
    assert ModelConfig.of(tiny_model_config(vocab_size=256)).padded_vocab_size == 256
    assert ModelConfig.of(tiny_model_config(vocab_size=64, padded_vocab_size=64)
                          ).padded_vocab_size == 64  # explicit: no padding
    with pytest.raises(ConfigError, match="model.padded_vocab_size"):
        ModelConfig.of(tiny_model_config(vocab_size=64, padded_vocab_size=32))


@pytest.fixture(scope="module")
def tiny_model():
    model = Transfusion(tiny_model_config(vocab_size=50), rngs=nnx.Rngs(0))
    batch, _, _ = random_batch(2, model.cfg, batch_size=2, seq_len=24, max_images=1)
    logits, _ = model(batch, batch["images"], jnp.zeros(batch["image_mask"].shape))
    return model, batch, np.asarray(logits)


def test_padded_logits_are_masked_and_loss_matches_unpadded_numpy(tiny_model):
    model, batch, logits = tiny_model
    v, vp = model.cfg.vocab_size, model.cfg.padded_vocab_size
    assert model.embed[...].shape[0] == vp and model.lm_head.kernel[...].shape[1] == vp
    assert logits.shape[-1] == vp
    assert (logits[..., v:] == PAD_LOGIT).all() and (logits[..., :v] > -1e3).all()
    # The LM loss of the padded model equals a numpy reference of the unpadded model:
    # the same hidden states times the first vocab_size columns of the head.
    tokens = np.asarray(batch["tokens"])
    weights = np.asarray(losses.lm_target_weights(batch["segment_ids"], batch["image_index"]))
    nll, _ = losses.next_token_nll(jnp.asarray(logits), batch["tokens"])
    got = float((np.asarray(nll) * weights).sum() / weights.sum())
    real = logits[..., :v].astype(np.float64)  # = hidden @ kernel[:, :v]
    log_z = np.log(np.exp(real - real.max(-1, keepdims=True)).sum(-1)) + real.max(-1)
    targets = np.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    ref_nll = log_z - np.take_along_axis(real, targets[..., None], -1)[..., 0]
    ref = (ref_nll * weights).sum() / weights.sum()
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    # Padding changes no weight: an unpadded model from the same seed has exactly the
    # first vocab_size rows / columns, and the padded ones are 0.
    unpadded = Transfusion(tiny_model_config(vocab_size=50, padded_vocab_size=50),
                           rngs=nnx.Rngs(0))
    head, embed = model.lm_head.kernel[...], model.embed[...]
    np.testing.assert_array_equal(unpadded.lm_head.kernel[...], head[:, :v])
    np.testing.assert_array_equal(unpadded.embed[...], embed[:v])
    assert not np.asarray(head[:, v:]).any() and not np.asarray(embed[v:]).any()
    for a, b in zip(jax.tree.leaves(nnx.state(unpadded.backbone)),
                    jax.tree.leaves(nnx.state(model.backbone))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1e4, 0, 1.0), (1.0, 0, 1.0),
                                                     (50.0, 100, 1.0), (50.0, 0, 0.9999)])
def test_padded_ids_are_never_sampled(temperature, top_k, top_p):
    v, vp, rows = 50, 128, 4096
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(rows, vp)).astype(np.float32)
    logits[:, v:] = PAD_LOGIT
    banned = np.zeros((rows, v), bool)  # generate.py's mask covers vocab_size ids only
    banned[:, 0] = True
    keys = jax.random.split(jax.random.key(1), rows)
    out = np.asarray(sample_tokens(jnp.asarray(logits), keys, temperature=temperature,
                                   top_k=top_k, top_p=top_p, banned=jnp.asarray(banned)))
    assert out.max() < v and (out != 0).all()
    assert len(np.unique(out)) > 30  # really sampling, not greedy
    # Even padded logits that were not masked by the model are banned by the mask's width.
    raw = rng.normal(size=(rows, vp)).astype(np.float32) * 10
    out = np.asarray(sample_tokens(jnp.asarray(raw), keys, temperature=temperature,
                                   top_k=top_k, top_p=top_p, banned=jnp.asarray(banned)))
    assert out.max() < v
    greedy = np.asarray(sample_tokens(jnp.asarray(raw), keys, temperature=0.0,
                                      banned=jnp.asarray(banned)))
    assert greedy.max() < v


def test_sharded_lm_head_over_tensor4():
    config = tiny_config(vocab_size=50, width=64, num_heads=4, mlp_hidden=128)
    mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=4))
    table = sharding.rule_table()
    _, params = init_params(config.model, mesh, table, seed=0)
    assert _array(params["lm_head"]["kernel"]).sharding.spec == PartitionSpec("fsdp", "tensor")
    assert _array(params["embed"]).sharding.spec == PartitionSpec("tensor", "fsdp")
    graphdef, _ = abstract_model(config.model)
    model = nnx.merge(graphdef, params)
    hidden = jnp.ones((2, 8, 64), jnp.float32)

    @jax.jit
    def logits(model, hidden):
        with sharding.activation_sharding(mesh, table):
            return model.logits(hidden)

    out = logits(model, hidden)
    assert out.shape == (2, 8, 128)
    assert out.sharding.spec[-1] == "tensor", out.sharding.spec
    assert (np.asarray(out)[..., 50:] == PAD_LOGIT).all()


def test_config_json_records_padded_size_and_old_runs_are_refused(tmp_path):
    from tests.helpers.train_fixtures import synthetic_config
    from tfusion.train.validate import validate_config

    config = synthetic_config()
    config.model.vocab_size = 200
    validate_config(config, num_devices=1, process_count=1)
    assert config.model.padded_vocab_size == 256  # resolved: config.json records it
    saved = json.loads(config.to_json_best_effort())
    assert saved["model"]["padded_vocab_size"] == 256
    (tmp_path / "config.json").write_text(json.dumps(saved))
    check_resume_config(str(tmp_path), config)  # same run: fine
    del saved["model"]["padded_vocab_size"]  # a run saved before padding existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"model.padded_vocab_size.*200 embedding.*"
                                          r"padded_vocab_size=200"):
        check_resume_config(str(tmp_path), config)
    config.model.padded_vocab_size = 200  # resumes it unpadded
    check_resume_config(str(tmp_path), config)


# --- indivisible axes are errors ---

def test_indivisible_param_is_refused_naming_param_and_axes():
    config = tiny_config(vocab_size=64, width=32, num_heads=2, mlp_hidden=96)  # 2 heads
    _, abstract = abstract_model(config.model)
    sizes = dict(data=1, fsdp=2, tensor=4)
    with pytest.raises(sharding.ShardingError,
                       match=r"param \['backbone'\].*logical axis 'kv_heads'.*mesh axis "
                             r"'tensor'.*allow_replicated=\('kv_heads',\)"):
        sharding.state_specs(abstract, sizes, sharding.rule_table())
    # Explicit opt-out per logical axis: replicated over tensor, the rest still sharded.
    table = sharding.rule_table(allow_replicated=("kv_heads", "heads", "mlp"))
    specs = sharding.state_specs(abstract, sizes, table)
    qkv = specs["backbone"]["blocks"]["attn"]["qkv"]["kernel"]
    assert "tensor" not in jax.tree.leaves(tuple(qkv)) and "fsdp" in tuple(qkv)
    with pytest.raises(ValueError, match="mesh.allow_replicated: unknown logical axis"):
        sharding.rule_table(allow_replicated=("vocabb",))


def test_indivisible_activation_is_refused_naming_it():
    mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=4))
    table = sharding.rule_table()

    def f(x):
        with sharding.activation_sharding(mesh, table):
            return sharding.constrain(x, ("activation_batch", "activation_length",
                                          "activation_vocab"), what="logits")

    with pytest.raises(sharding.ShardingError,
                       match=r"logits \(2, 4, 50\).*logical axis 'activation_vocab'.*"
                             r"mesh axis 'tensor'"):
        jax.jit(f)(jnp.zeros((2, 4, 50)))
    # Batch rows are always allowed to replicate (inference takes any row count).
    jax.jit(f)(jnp.zeros((1, 4, 64)))
    table = sharding.rule_table(allow_replicated=("activation_vocab",))

    def g(x):
        with sharding.activation_sharding(mesh, table):
            return sharding.constrain(x, ("activation_batch", None, "activation_vocab"))

    jax.jit(g)(jnp.zeros((2, 4, 50)))


def test_validate_config_refuses_indivisible_mesh_naming_param():
    from tests.helpers.train_fixtures import synthetic_config
    from tfusion.train.validate import validate_config

    config = synthetic_config()
    config.model.update(num_heads=2, num_kv_heads=0)
    config.mesh.update(data=1, fsdp=2, tensor=4)
    with pytest.raises(ConfigError, match=r"config.mesh: .*tensor=4.*param .*'kv_heads'"):
        validate_config(config, num_devices=8, process_count=1)
    config.mesh.allow_replicated = ("heads", "kv_heads", "activation_heads",
                                    "activation_kv_heads")
    validate_config(config, num_devices=8, process_count=1)


# --- U-Net over fsdp ---

def test_unet_params_sharded_over_fsdp():
    config = tiny_config(vocab_size=64, width=32, modality_layer="unet",
                         unet_channels=(32, 64), latent_channels=3)
    mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1))
    _, params = init_params(config.model, mesh, sharding.rule_table(), seed=0)
    for part in ("image_encoder", "image_decoder"):
        leaves = jax.tree_util.tree_leaves_with_path(params[part])
        big = [(jax.tree_util.keystr(p), x) for p, x in leaves if x.size >= 1024]
        assert big
        for name, x in big:
            assert "fsdp" in jax.tree.leaves(tuple(x.sharding.spec)), name
    # The latent-facing convolutions shard their channel axis, never the 3 latent ones.
    assert _array(params["image_encoder"]["conv_in"]["kernel"]).sharding.spec == PartitionSpec(
        None, None, None, "fsdp")
    assert _array(params["image_decoder"]["conv_out"]["kernel"]).sharding.spec == PartitionSpec(
        None, None, "fsdp", None)


# --- paper configs on their natural topologies (docs/experiments.md), no devices ---

NATURAL_FSDP = {"0.16B": 64, "0.37B": 64, "0.76B": 64, "1.4B": 128, "7B": 128}


@pytest.mark.parametrize("size", list(NATURAL_FSDP))
@pytest.mark.parametrize("layer", ["linear", "unet"])
def test_paper_configs_shard_on_natural_topologies(size, layer):
    from experiments import registry

    name = f"transfusion_{size}" if layer == "linear" else f"transfusion_{size}_unet_p2"
    config = registry.get_config(name)
    _, abstract = abstract_model(config.model)
    table = sharding.mesh_rules(config.mesh)
    fsdp = NATURAL_FSDP[size]
    for sizes in (dict(data=1, fsdp=fsdp, tensor=1), dict(data=1, fsdp=fsdp // 4, tensor=4)):
        specs = sharding.state_specs(abstract, sizes, table)  # raises if anything does not divide
        head = specs["lm_head"]["kernel"]
        assert head == PartitionSpec("fsdp", "tensor")
        if layer == "unet":
            flat = jax.tree.leaves(specs["image_encoder"],
                                   is_leaf=lambda x: isinstance(x, PartitionSpec))
            assert sum("fsdp" in tuple(s) for s in flat) >= len(flat) - 4


# --- flow + eps ---

def test_flow_with_eps_prediction_is_refused():
    c = diffusion_config()
    c.update(process="flow", prediction="eps", sampler="euler")
    with pytest.raises(ConfigError, match=r"config.diffusion.prediction: 'eps' is undefined "
                                          r"for process='flow'.*divides by 0 at t = 1"):
        DiffusionConfig.of(c)
    c.prediction = "v"
    DiffusionConfig.of(c)
