"""A trained model from a run directory: workdir/config.json + workdir/checkpoints/<step>.

Only the parameters are read (the EMA or the raw ones, never the optimizer state:
orbax restores just that entry of the saved state), straight into their shardings on
a mesh built from the run's own mesh config (config.mesh, its rule table) over the
available devices; nothing is gathered to one host. A directory written by
launch.export (a params-only checkpoint) loads the same way. A missing run directory,
config.json or checkpoint raises RunNotFoundError, whose message is the one line the
CLIs print.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional, Sequence

import ml_collections
from flax import nnx


class RunNotFoundError(FileNotFoundError):
    """The run directory, its config.json or the asked checkpoint does not exist."""


class UnreadableCheckpointError(RunNotFoundError):
    """The checkpoint exists but cannot be restored (truncated or missing files)."""


def _tuples(value):
    # config.json stores tuples as lists; config fields such as unet_channels are tuples.
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


# Fields removed from the configs, with the one value they could hold and keep working
# the same: a run saved with that value loads without the field; any other value is
# an error (the run was trained with something this code no longer does).
RETIRED_FIELDS = {("model", "param_dtype"): "float32"}  # params were always float32


def _drop_retired(saved: dict, path: str) -> None:
    for (section, field), same in RETIRED_FIELDS.items():
        value = saved.get(section, {}).get(field, same)
        if value != same:
            raise ValueError(f"{path}: config.{section}.{field}={value!r} is no longer "
                             f"supported; runs saved with {same!r} load without it")
        saved.get(section, {}).pop(field, None)


def _merge(defaults: ml_collections.ConfigDict, saved: dict) -> None:
    for key, value in saved.items():
        if isinstance(value, dict) and isinstance(defaults.get(key), ml_collections.ConfigDict):
            _merge(defaults[key], value)
        else:
            defaults[key] = value


def load_config(workdir: str, defaults: Optional[ml_collections.ConfigDict] = None
                ) -> ml_collections.ConfigDict:
    """The run's saved config. With `defaults` (the experiment's current config), the
    saved values are laid over it, so fields added to the code since the run was
    started get their defaults instead of failing as missing. Without, the model
    section is still laid over ModelConfig's defaults: a model field added since takes
    the behaviour from before it existed, which is what the run was built with."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isdir(workdir):
        raise RunNotFoundError(f"no run directory {workdir}")
    if not os.path.isfile(path):
        raise RunNotFoundError(f"no config.json in {workdir} (not a training run directory?)")
    with open(path) as f:
        saved = _tuples(json.load(f))
    _drop_retired(saved, path)
    model = saved.get("model", {})
    if "vocab_size" in model and "padded_vocab_size" not in model:
        # Saved before the vocab was padded to a multiple of 128: its embedding and
        # head have exactly vocab_size rows.
        model["padded_vocab_size"] = model["vocab_size"]
    if defaults is None:
        from tfusion.config import model_config
        defaults = ml_collections.ConfigDict(dict(model=model_config()))
    _merge(defaults, saved)
    return defaults


PARAMS = ("ema", "raw")


def override_attention_kernel(config, kernel: Optional[str]) -> None:
    """Sets config.model.attention_kernel (the CLIs' --attention_kernel; None = keep the
    run's). A kernel only changes how attention is computed, never the params."""
    from tfusion.config import ATTENTION_KERNELS, ConfigError

    if kernel is None:
        return
    if kernel not in ATTENTION_KERNELS:
        raise ConfigError("model.attention_kernel", f"--attention_kernel={kernel!r} is not "
                          f"one of {ATTENTION_KERNELS}")
    config.model.attention_kernel = kernel


def override_sampling(config, sampler: Optional[str] = None, spacing: Optional[str] = None,
                      cfg_interval: Optional[Sequence[float]] = None) -> None:
    """Sets config.diffusion's sampler / sample_spacing / cfg_interval (the CLIs'
    --sampler, --spacing, --cfg_interval; None = keep the run's) and validates the
    section: a sampler or spacing that does not fit the run's process fails here with
    a ConfigError naming the field."""
    from tfusion.config import DiffusionConfig

    for field, value in (("sampler", sampler), ("sample_spacing", spacing)):
        if value is not None:
            config.diffusion[field] = value
    if cfg_interval is not None:
        config.diffusion.cfg_interval = tuple(float(v) for v in cfg_interval)
    DiffusionConfig.of(config.diffusion)


def _existing_step(checkpointer, step: Optional[int]) -> int:
    """`step`, or the newest when None; RunNotFoundError listing the saved steps when
    there is no such checkpoint."""
    saved = sorted(checkpointer.all_steps())
    if not saved:
        raise RunNotFoundError(f"no checkpoint in {checkpointer.directory}")
    if step is None:
        return saved[-1]
    if step not in saved:
        raise RunNotFoundError(f"no checkpoint for step {step} in {checkpointer.directory}; "
                               f"available: {', '.join(map(str, saved))}")
    return step


EXPORT_FILE = "export.json"  # launch.export: which params a params-only checkpoint holds


def params_entry(saved: list[str], params: str, workdir: str) -> str:
    """The entry of the saved state to read: "ema_params" for params="ema" where the
    run kept an EMA, else "params" (with a log line saying so)."""
    log = logging.getLogger(__name__)
    exported = os.path.join(workdir, EXPORT_FILE)
    if os.path.isfile(exported):
        with open(exported) as f:
            kind = json.load(f).get("params")
        if kind and kind != params:
            log.warning("%s holds the %s parameters only (exported); using them, not %s",
                        workdir, kind, params)
        return "params"
    if params == "ema" and "ema_params" in saved:
        return "ema_params"
    if params == "ema":
        log.info("the run has no EMA (train.ema_decay = 0): using the raw parameters")
    return "params"


def restore_params(workdir: str, step: Optional[int], config, params: str = "ema",
                   devices=None) -> tuple[dict, int, str]:
    """(params as a pure dict of sharded arrays, step, the entry read: "params" or
    "ema_params"); see load_model. Only that entry of the checkpoint is read."""
    from tfusion import sharding
    from tfusion.train import state as state_lib
    from tfusion.train.checkpoint import Checkpointer, short_error

    if params not in PARAMS:
        raise ValueError(f"params: unknown {params!r}; choose from {PARAMS}")
    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not os.path.isdir(directory):  # Checkpointer would create it
        raise RunNotFoundError(f"no checkpoint in {directory}")
    from tfusion.config import ConfigError
    try:
        mesh = sharding.make_mesh(config.mesh, devices)
        table = sharding.mesh_rules(config.mesh)
    except ValueError as e:  # e.g. the run's mesh axes do not divide these devices
        raise ConfigError("mesh", f"{e} (the run's mesh section, on "
                          f"{len(devices) if devices else 'all'} devices)") from e
    abstract = state_lib.abstract_params(config.model, mesh, table)
    checkpointer = Checkpointer(directory, keep=1_000_000, async_save=False)
    try:
        step = _existing_step(checkpointer, step)
        try:
            key = params_entry(checkpointer.saved_entries(step), params, workdir)
            restored = checkpointer.restore_entries(step, {key: abstract})[key]
        except Exception as e:  # orbax/tensorstore raise many types for broken files
            others = [s for s in checkpointer.all_steps() if s != step]
            raise UnreadableCheckpointError(
                f"checkpoint step {step} in {directory} cannot be read "
                f"({type(e).__name__}: {short_error(e)}); other steps: "
                f"{', '.join(map(str, sorted(others))) or 'none'} (--step)") from e
    finally:
        checkpointer.close()
    return restored, int(step), key


def load_model(workdir: str, step: Optional[int] = None, config=None, params: str = "ema",
               *, devices=None):
    """(model, config, step) from the newest (or given) checkpoint of a run.

    params: "ema" (default) = the EMA of the parameters where the run kept one
    (train.ema_decay > 0; otherwise the raw parameters, with a log line); "raw" = the
    optimizer's parameters. The model's params are sharded on a mesh of `devices`
    (default: all) shaped by config.mesh, as the run's rule table says; pass a config
    with config.model.attention_kernel changed to sample with another kernel."""
    from tfusion.train.params import abstract_model

    if params not in PARAMS:
        raise ValueError(f"params: unknown {params!r}; choose from {PARAMS}")
    config = config or load_config(workdir)
    restored, step, _ = restore_params(workdir, step, config, params, devices)
    graphdef, _ = abstract_model(config.model)
    return nnx.merge(graphdef, restored), config, step
