"""Bad config values fail at start-up with a message naming the field."""
import pytest

from tfusion.config import (ConfigError, DiffusionConfig, ModelConfig, diffusion_config,
                            model_config)

BAD_MODEL = [
    ("width", dict(width=100, num_heads=3), "model.width"),
    ("odd head dim", dict(width=36, num_heads=4), "model.num_heads"),
    ("gqa", dict(num_heads=12, num_kv_heads=5), "model.num_kv_heads"),
    ("patch", dict(latent_height=30, patch_size=4), "model.patch_size"),
    ("modality", dict(modality_layer="mlp"), "model.modality_layer"),
    ("unet levels", dict(modality_layer="unet", patch_size=4, unet_channels=(64, 64)),
     "model.unet_channels"),
    ("remat", dict(remat_policy="sometimes"), "model.remat_policy"),
    ("kernel", dict(attention_kernel="magic"), "model.attention_kernel"),
    ("dtype", dict(dtype="float8"), "model.dtype"),
    ("vocab", dict(vocab_size=0), "model.vocab_size"),
    ("pad", dict(pad_id=40_000), "model.pad_id"),
    ("image attention", dict(image_attention="sideways"), "model.image_attention"),
]


@pytest.mark.parametrize("name,overrides,field", BAD_MODEL, ids=[b[0] for b in BAD_MODEL])
def test_bad_model_field_is_named(name, overrides, field):
    c = model_config()
    c.update(overrides)
    with pytest.raises(ConfigError, match=f"^config.{field}:"):
        ModelConfig.of(c)


def test_model_config_is_typed_frozen_and_derives_sizes():
    import dataclasses

    c = model_config()
    c.update(width=96, num_heads=6, num_kv_heads=2, mlp_hidden=0, latent_height=16,
             latent_width=8, latent_channels=3, patch_size=4)
    m = ModelConfig.of(c)
    assert ModelConfig.of(m) is m
    # Derived sizes against the formulas written out here.
    assert (m.head_dim, m.kv_heads, m.grid_h, m.grid_w) == (16, 2, 4, 2)
    assert m.patches_per_image == (16 // 4) * (8 // 4) and m.patch_dim == 4 * 4 * 3
    assert m.mlp_dim == 256  # 8/3 * 96 = 256, rounded up to a multiple of 256
    assert ModelConfig.of(dict(c.to_dict(), num_kv_heads=0)).kv_heads == 6
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.width = 128
    hash(m)  # usable as a static jit argument


def test_model_config_unknown_and_missing_fields_are_named():
    c = model_config()
    with pytest.raises(ConfigError, match="^config.model.widht: unknown field"):
        ModelConfig.of(dict(c.to_dict(), widht=3))
    values = c.to_dict()
    del values["rope_theta"]
    with pytest.raises(ConfigError, match="^config.model.rope_theta: missing"):
        ModelConfig.of(values)


def test_defaults_are_valid():
    ModelConfig.of(model_config())
    DiffusionConfig.of(diffusion_config())


@pytest.mark.parametrize("overrides,field", [
    (dict(noise_limit_t=1000), "diffusion.noise_limit_t"),
    (dict(schedule="sigmoid"), "diffusion.schedule"),
    (dict(cfg_dropout=1.5), "diffusion.cfg_dropout"),
    (dict(sample_steps=0), "diffusion.sample_steps"),
    (dict(process="score"), "diffusion.process"),
    (dict(process="flow", sampler="ddpm"), "diffusion.sampler"),
    (dict(prediction="noise"), "diffusion.prediction"),
    (dict(min_snr_gamma=0.0), "diffusion.min_snr_gamma"),
    (dict(schedule_shift=-1.0), "diffusion.schedule_shift"),
])
def test_bad_diffusion_field_is_named(overrides, field):
    c = diffusion_config()
    c.update(overrides)
    with pytest.raises(ConfigError, match=f"^config.{field}:"):
        DiffusionConfig.of(c)


@pytest.mark.parametrize("value, field", [("discret", "model.image_representation"),
                                          ("discrete", "model.codebook_size")])
def test_image_representation_override_is_checked_by_the_trainer(value, field):
    """An override applied after the registry built the config (as --config.X=Y is) is
    still refused by the trainer's start-up validation, naming the field."""
    from experiments.registry import get_config
    from tfusion.train.validate import validate_config

    config = get_config("shapes_tiny")
    validate_config(config, num_devices=1, process_count=1)
    config.model.image_representation = value
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_config(config, num_devices=1, process_count=1)


@pytest.mark.parametrize("family", ["transfusion", "chameleon"])
def test_image_outputs_are_refused_only_without_a_decoder(family):
    """Both families may sample grids and run image suites; precomputed latents have
    no decoder to make pixels, so a run asking for them fails at start-up."""
    from experiments.micro import micro_config
    from tfusion.train.validate import validate_train_config

    config = micro_config(family, "w64")
    config.train.update(sample_every=100, final_eval_suite="shapes")
    validate_train_config(config)
    config.data.encoder = "precomputed"
    with pytest.raises(ConfigError, match=r"train\.sample_every"):
        validate_train_config(config)


def test_a_final_suite_needing_more_held_out_records_is_refused_at_start_up():
    """The shapes suite reads 64 held-out captions: an eval split of 16 would end the
    run with a traceback after its last step; now it is refused before step 0."""
    from experiments.registry import get_config
    from tfusion.train.validate import validate_train_config

    config = get_config("shapes_tiny")
    config.data.eval_examples = 16
    with pytest.raises(ConfigError, match=r"data\.eval_examples: 16 held-out records, but "
                                          r"the 'shapes' suite reads 64"):
        validate_train_config(config)
    config.train.final_eval_suite = "text"
    validate_train_config(config)
    config.data.eval_examples = 64
    config.train.final_eval_suite = "shapes"
    validate_train_config(config)


def test_diffusion_and_loss_sections_are_typed_and_checked():
    import dataclasses

    from tfusion.config import LossConfig, loss_config
    d = DiffusionConfig.of(diffusion_config())
    assert d == DiffusionConfig() and DiffusionConfig.of(d) is d
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.prediction = "v"
    with pytest.raises(ConfigError, match="^config.diffusion.sampel_steps: unknown field"):
        DiffusionConfig.of(dict(diffusion_config().to_dict(), sampel_steps=10))
    bad = loss_config()
    bad.z_loss_weight = -1e-5
    with pytest.raises(ConfigError, match="^config.loss.z_loss_weight:"):
        LossConfig.of(bad)


def test_ml_collections_defaults_are_the_dataclass_defaults():
    # One place documents each field: the ConfigDict an experiment overrides holds
    # exactly the dataclass's fields and defaults, so a round trip changes nothing.
    import dataclasses

    c = model_config()
    assert ModelConfig.of(c) == ModelConfig()
    assert set(c.keys()) == {f.name for f in dataclasses.fields(ModelConfig)}


def test_runs_saved_with_a_retired_field_load_or_fail_naming_it(tmp_path):
    import json

    from tfusion.eval.checkpoints import load_config
    saved = dict(model=dict(model_config().to_dict(), param_dtype="float32"),
                 diffusion=diffusion_config().to_dict())
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = load_config(str(tmp_path))
    assert "param_dtype" not in loaded.model
    assert ModelConfig.of(loaded.model) == ModelConfig()
    saved["model"]["param_dtype"] = "bfloat16"  # a run this code cannot reproduce
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="config.model.param_dtype='bfloat16'"):
        load_config(str(tmp_path))
