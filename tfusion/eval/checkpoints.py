"""A trained model from a run directory: workdir/config.json + workdir/checkpoints/<step>.

Only the parameters are needed, but orbax restores the state it saved as a whole,
so the optimizer state is restored too (abstractly typed, then dropped). A missing
run directory, config.json or checkpoint raises RunNotFoundError, whose message is
the one line the CLIs print.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

import jax
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
    started get their defaults instead of failing as missing."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isdir(workdir):
        raise RunNotFoundError(f"no run directory {workdir}")
    if not os.path.isfile(path):
        raise RunNotFoundError(f"no config.json in {workdir} (not a training run directory?)")
    with open(path) as f:
        saved = _tuples(json.load(f))
    _drop_retired(saved, path)
    if defaults is None:
        return ml_collections.ConfigDict(saved)
    _merge(defaults, saved)
    return defaults


PARAMS = ("ema", "raw")


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


def load_model(workdir: str, step: Optional[int] = None, config=None, params: str = "ema"):
    """(model, config, step) from the newest (or given) checkpoint of a run.

    params: "ema" (default) = the EMA of the parameters where the run kept one
    (train.ema_decay > 0; otherwise the raw parameters, with a log line); "raw" = the
    optimizer's parameters."""
    from tfusion import sharding
    from tfusion.train import optimizer, state as state_lib
    from tfusion.train.checkpoint import Checkpointer, short_error
    from tfusion.train.params import abstract_model

    if params not in PARAMS:
        raise ValueError(f"params: unknown {params!r}; choose from {PARAMS}")
    config = config or load_config(workdir)
    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not os.path.isdir(directory):  # Checkpointer would create it
        raise RunNotFoundError(f"no checkpoint in {directory}")
    checkpointer = Checkpointer(directory, keep=1_000_000, async_save=False)
    try:
        step = _existing_step(checkpointer, step)
        mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
        table = sharding.rule_table(config.mesh.rule_overrides)
        tx = optimizer.make_optimizer(config.optimizer)
        ema = state_lib.uses_ema(config)
        target = state_lib.abstract_state(
            config.model, tx, state_lib.train_state_shardings(config.model, tx, mesh, table, ema=ema))
        try:
            state, _ = checkpointer.restore(step, target)
        except Exception as e:  # orbax/tensorstore raise many types for broken files
            others = [s for s in checkpointer.all_steps() if s != step]
            raise UnreadableCheckpointError(
                f"checkpoint step {step} in {directory} cannot be read "
                f"({type(e).__name__}: {short_error(e)}); other steps: "
                f"{', '.join(map(str, sorted(others))) or 'none'} (--step)") from e
    finally:
        checkpointer.close()
    key = "ema_params" if params == "ema" and ema else "params"
    if params == "ema" and not ema:
        logging.getLogger(__name__).info("the run has no EMA (train.ema_decay = 0): using "
                                         "the raw parameters")
    graphdef, _ = abstract_model(config.model)
    model = nnx.merge(graphdef, jax.device_get(state[key]))
    return model, config, int(step)
