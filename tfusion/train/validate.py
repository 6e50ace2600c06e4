"""Start-up validation of what the trainer needs from an experiment config (model,
diffusion, loss, train, optimizer, mesh); errors name the field. config.data is the input
pipeline's: data_pipelines.validate_data_config, called by launch/train_setup.py."""
from __future__ import annotations

import jax

from tfusion.batch import capacity_per_unit
from tfusion import sharding
from tfusion.config import ConfigError, DiffusionConfig, LossConfig, ModelConfig
from tfusion.train.optimizer import PARAM_GROUPS
from tfusion.eval.suite_sources import SUITES, heldout_problem, source_problem
from tfusion.train.warm_start import validate_init_from


def validate_train_config(config) -> None:
    t = config.train
    for field in ("steps", "batch_size", "grad_accum_steps", "log_every", "keep_checkpoints",
                  "max_nonfinite_steps"):
        if not isinstance(t[field], int) or t[field] <= 0:
            raise ConfigError(f"train.{field}", f"must be a positive int, got {t[field]!r}")
    for field in ("checkpoint_every", "eval_every", "sample_every"):
        if not isinstance(t[field], int) or t[field] < 0:
            raise ConfigError(f"train.{field}", f"must be an int >= 0 (0 = never), got {t[field]!r}")
    if t.batch_size % t.grad_accum_steps:
        raise ConfigError("train.grad_accum_steps", f"{t.grad_accum_steps} does not divide "
                                                    f"batch_size={t.batch_size}")
    suite = t.get("final_eval_suite", "")
    if suite and suite not in SUITES and suite != "all":
        raise ConfigError("train.final_eval_suite", f"unknown {suite!r}; choose from "
                                                    f"{('', *SUITES, 'all')}")
    source = config.data.get("source") if config.get("data") else None
    problem = source_problem(suite, source) if suite in SUITES else ""
    if problem:
        # Found now, not after the last step (the suite would raise at the end of training).
        raise ConfigError("train.final_eval_suite", f"{problem}: use 'text' (or 'all': "
                                                    "what applies)")
    if suite and source and source != "none":
        problem = heldout_problem(suite, source, config.data.eval_examples)
        if problem:
            raise ConfigError("data.eval_examples", f"{problem} (train.final_eval_suite="
                                                    f"{suite!r}): raise it, or choose another suite")
    needs_pixels = t.sample_every or suite in ("shapes", "fid", "digits", "edit", "all")
    if needs_pixels and config.get("data") and config.data.get("encoder") == "precomputed":
        field = "train.sample_every" if t.sample_every else "train.final_eval_suite"
        raise ConfigError(field, "sampled images are decoded to pixels by data.encoder, and "
                                 "precomputed latents have no decoder: set 0 / 'text', or "
                                 "train from images with data.encoder vae or vq")
    if not 0.0 <= t.get("ema_decay", 0.0) < 1.0:
        raise ConfigError("train.ema_decay", f"{t.ema_decay} outside [0, 1) (0 = off)")
    if t.get("preemption_timeout_s", 0) < 0:
        raise ConfigError("train.preemption_timeout_s", "must be >= 0 (0 = no deadline)")
    if t.get("preemption_sync_every", 1) < 1:
        raise ConfigError("train.preemption_sync_every", "must be >= 1 (steps)")
    if t.peak_flops_per_device < 0:
        raise ConfigError("train.peak_flops_per_device", "must be >= 0 (0 = look up)")
    unknown = [g for g in t.get("freeze", ()) if g not in PARAM_GROUPS]
    if unknown:
        raise ConfigError("train.freeze", f"unknown param group(s) {unknown}; choose from "
                                          f"{tuple(PARAM_GROUPS)}")
    validate_init_from(t)


def validate_image_representation(c) -> None:
    """Raises ConfigError naming the field when the two representations are mixed up.

    Part of validate_config, so it sees command-line overrides: a typo in
    --config.model.image_representation must not silently train the continuous model."""
    m = c.model
    kind = m.get("image_representation", "continuous")
    if kind not in ("continuous", "discrete"):
        raise ConfigError("model.image_representation",
                          f"unknown {kind!r}; choose 'continuous' or 'discrete'")
    if kind == "continuous":
        if m.get("codebook_size", 0):
            raise ConfigError("model.codebook_size", "only discrete images have a codebook")
        return
    if m.codebook_size <= 0 or m.image_tokens <= 0:
        raise ConfigError("model.codebook_size", "discrete images need codebook_size and "
                                                 "image_tokens > 0")
    if m.vocab_size <= m.codebook_size:
        raise ConfigError("model.vocab_size", f"{m.vocab_size} leaves no text ids before the "
                                              f"{m.codebook_size}-entry codebook")
    if c.data.max_images_per_row:
        raise ConfigError("data.max_images_per_row", "discrete images use no image slots (0)")
    if m.image_tokens + 2 > c.data.seq_len:
        raise ConfigError("data.seq_len", f"{c.data.seq_len} cannot hold one "
                                          f"{m.image_tokens}-token image with BOI/EOI")


def validate_optimizer_config(o) -> None:
    if not o.learning_rate > 0:
        raise ConfigError("optimizer.learning_rate", f"must be > 0, got {o.learning_rate}")
    if not 0 <= o.final_learning_rate <= o.learning_rate:
        raise ConfigError("optimizer.final_learning_rate",
                          f"{o.final_learning_rate} outside [0, learning_rate={o.learning_rate}]")
    if o.warmup_steps < 0:
        raise ConfigError("optimizer.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    for field in ("b1", "b2"):
        if not 0 <= o[field] < 1:
            raise ConfigError(f"optimizer.{field}", f"{o[field]} outside [0, 1)")
    if not o.eps > 0:
        raise ConfigError("optimizer.eps", f"must be > 0, got {o.eps}")
    if o.weight_decay < 0:
        raise ConfigError("optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")
    if o.grad_clip < 0:
        raise ConfigError("optimizer.grad_clip", f"must be >= 0 (0 = off), got {o.grad_clip}")


def validate_mesh_config(config, num_devices: int, process_count: int) -> dict:
    """Returns the resolved mesh axis sizes; the batch must split over its axes."""
    try:
        sizes = sharding.mesh_shape(config.mesh, num_devices)
        sharding.mesh_rules(config.mesh)
    except ValueError as e:
        raise ConfigError("mesh", str(e)) from e
    batch_ways = sizes["data"] * sizes["fsdp"]
    micro = config.train.batch_size // config.train.grad_accum_steps
    if micro % batch_ways:
        raise ConfigError("train.batch_size",
                          f"microbatch {micro} rows (batch_size / grad_accum_steps) must divide "
                          f"over data x fsdp = {batch_ways} devices")
    if config.train.batch_size % process_count:
        raise ConfigError("train.batch_size",
                          f"{config.train.batch_size} rows do not split over {process_count} "
                          "processes")
    per_row = config.get("data", {}).get("image_capacity_per_row", 0.0)
    if per_row:
        unit_rows = micro // batch_ways
        per_unit = capacity_per_unit(per_row, unit_rows)
        slots = config.data.max_images_per_row
        if per_unit < slots:
            raise ConfigError("data.image_capacity_per_row",
                              f"{per_row} x {unit_rows} rows per device and microbatch = "
                              f"{per_unit} images, fewer than one full row's {slots} slots: "
                              "raise it, or put more rows on each device")
    return sizes


def check_param_sharding(config, sizes) -> None:
    """Every parameter's rule divides its dimension on a mesh of these axis sizes
    ({data, fsdp, tensor}; no devices needed), else ConfigError naming the parameter
    path, logical axis and mesh axis (tfusion/sharding.py; opt-out per logical axis:
    mesh.allow_replicated)."""
    from tfusion.train.params import abstract_model  # builds the model: import late

    if sizes.get("fsdp", 1) == 1 and sizes.get("tensor", 1) == 1:
        return  # parameters are sharded over fsdp and tensor only
    _, abstract = abstract_model(config.model)
    try:
        sharding.state_specs(abstract, sizes, sharding.mesh_rules(config.mesh))
    except sharding.ShardingError as e:
        raise ConfigError("mesh", f"{sharding.describe_sizes(sizes)}: {e}") from e


def resolve_derived(config) -> None:
    """Writes derived model fields left at 0 into the config (so config.json records
    them): model.padded_vocab_size."""
    model = ModelConfig.of(config.model)
    if not config.model.get("padded_vocab_size", 0):
        config.model.padded_vocab_size = model.padded_vocab_size


def validate_config(config, num_devices: int | None = None,
                    process_count: int | None = None) -> None:
    """What the trainer needs, checked before any compilation or data loading; resolves
    derived fields in place (resolve_derived), so the config written next records them.

    config.data's own fields (sources, encoder, tokenizer) are checked by
    data_pipelines.validate_data_config, which the entry point that builds the input
    pipeline calls after this (launch/train_setup.py validate)."""
    ModelConfig.of(config.model)
    resolve_derived(config)
    validate_image_representation(config)
    DiffusionConfig.of(config.diffusion)
    if "loss" in config:
        LossConfig.of(config.loss)
    validate_train_config(config)
    validate_optimizer_config(config.optimizer)
    sizes = validate_mesh_config(
        config, jax.device_count() if num_devices is None else num_devices,
        jax.process_count() if process_count is None else process_count)
    check_param_sharding(config, sizes)
