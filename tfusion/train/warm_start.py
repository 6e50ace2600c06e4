"""train.init_from: a new run starts from another run's params (a warm start).

The source is a tfusion run directory (config.json + checkpoints/: a finished or
running run, or a params-only export by launch.export --format=orbax). Its newest
checkpoint's params (the EMA where it kept one and train.init_from_params = "ema")
are read straight into this run's mesh, sharded by this run's rule table; only that
entry of the checkpoint is read. Every param of the new model whose dotted name and
shape match a source param takes the source's value; the rest (new modality layers)
keep their fresh initialisation. Where the vocab grew (BOI/EOI added), the embedding
and LM head load the ids both vocabularies have and keep fresh rows for the new ids. What was loaded, what
is new and which source params went unused is logged and written to
workdir/warm_start.json. The optimizer state starts fresh, the EMA at the loaded
params. Only a run's first start warm-starts: a resume reads the run's own checkpoint.
"""
from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections

from tfusion.config import ConfigError, ModelConfig, model_config
from tfusion.model.transfusion import copy_text_to_image, image_twin_of

_log = logging.getLogger(__name__)
PARAMS_CHOICES = ("ema", "raw")
REPORT_FILE = "warm_start.json"


def validate_init_from(train_cfg) -> None:
    """Start-up check of train.init_from / init_from_params (errors name the field)."""
    path = train_cfg.get("init_from", "")
    which = train_cfg.get("init_from_params", "ema")
    if which not in PARAMS_CHOICES:
        raise ConfigError("train.init_from_params", f"unknown {which!r}; choose from "
                                                    f"{PARAMS_CHOICES}")
    if not path:
        return
    for need in ("config.json", "checkpoints"):
        if not os.path.exists(os.path.join(path, need)):
            raise ConfigError("train.init_from", f"{path!r} is not a tfusion run directory "
                                                 f"(no {need}); give a run or a "
                                                 "launch.export --format=orbax directory")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(_flat(value, name) if isinstance(value, dict) else {name: value})
    return out


def _unflat_like(tree: dict, flat: dict, prefix: str = "") -> dict:
    return {key: (_unflat_like(value, flat, f"{prefix}.{key}" if prefix else str(key))
                  if isinstance(value, dict) else flat[f"{prefix}.{key}" if prefix else str(key)])
            for key, value in tree.items()}


def read_source_params(path: str, which: str, mesh, table) -> tuple[dict, int, str, int]:
    """(the source run's params as a pure dict, sharded on `mesh` by `table`; its step;
    the entry read; its vocab_size)."""
    from tfusion.eval.checkpoints import load_config, params_entry
    from tfusion.train import state as state_lib
    from tfusion.train.checkpoint import Checkpointer

    # Model fields added to the code since the source run was saved take their defaults
    # (what the source was built with: every new field defaults to the old behaviour).
    source = load_config(path, ml_collections.ConfigDict(dict(model=model_config())))
    checkpointer = Checkpointer(os.path.abspath(os.path.join(path, "checkpoints")),
                                keep=1_000_000, async_save=False)
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise ConfigError("train.init_from", f"no checkpoint in {path}/checkpoints")
        entry = params_entry(checkpointer.saved_entries(step), which, path)
        abstract = state_lib.abstract_params(source.model, mesh, table)
        params = checkpointer.restore_entries(step, {entry: abstract})[entry]
    finally:
        checkpointer.close()
    return params, int(step), entry, int(source.model.vocab_size)


# Params with a vocab axis (rows padded to model.padded_vocab_size): the ids both
# vocabularies have are loaded, ids only the new one has keep their fresh rows.
VOCAB_AXIS = {"embed": 0, "lm_head.kernel": 1}


def _vocab_rows(fresh, src, axis: int, ids: int):
    """fresh with its first `ids` entries along `axis` taken from src."""
    index = (slice(None),) * axis + (slice(0, ids),)
    return fresh.at[index].set(src[index].astype(fresh.dtype))


def merge_matching(fresh: dict, source: dict, vocab: tuple[int, int] | None = None
                   ) -> tuple[dict, dict]:
    """fresh params with every leaf whose name and shape match a source leaf replaced by
    it (cast to the fresh leaf's dtype, in the fresh leaf's sharding); the report.
    vocab = (source vocab_size, new vocab_size): where they differ, the vocab-axis
    params load the ids both have (VOCAB_AXIS) and keep fresh rows for the others."""
    fresh_flat, source_flat = _flat(fresh), _flat(source)
    merged, loaded, new, mismatched, partial = {}, [], [], [], []
    for name, leaf in fresh_flat.items():
        src = source_flat.get(name)
        axis = VOCAB_AXIS.get(name)
        other = lambda a, b: [d for i, d in enumerate(a) if i != axis] == \
            [d for i, d in enumerate(b) if i != axis]
        if (src is not None and vocab is not None and vocab[0] != vocab[1] and axis is not None
                and other(src.shape, leaf.shape)):
            ids = min(vocab)
            merged[name] = jax.device_put(_vocab_rows(leaf, src, axis, ids), leaf.sharding)
            partial.append(f"{name}: ids 0..{ids - 1} loaded, {ids}..{vocab[1] - 1} new")
            loaded.append(name)
        elif src is not None and tuple(src.shape) == tuple(leaf.shape):
            merged[name] = jax.device_put(src.astype(leaf.dtype), leaf.sharding)
            loaded.append(name)
        else:
            merged[name] = leaf
            new.append(name)
            if src is not None:
                mismatched.append(f"{name}: source {tuple(src.shape)} vs {tuple(leaf.shape)}")
    unused = sorted(set(source_flat) - set(loaded))
    report = dict(loaded=loaded, new=new, vocab_rows=partial, shape_mismatch=mismatched,
                  source_unused=unused,
                  loaded_params=int(sum(fresh_flat[n].size for n in loaded)),
                  new_params=int(sum(fresh_flat[n].size for n in new)))
    return _unflat_like(fresh, merged), report


def warm_start(state: dict, config, mesh, table, workdir: str) -> dict:
    """A fresh train state with its params (and EMA) taken from train.init_from."""
    t = config.train
    path, which = t.init_from, t.get("init_from_params", "ema")
    source, step, entry, source_vocab = read_source_params(path, which, mesh, table)
    params, report = merge_matching(state["params"], source,
                                    (source_vocab, int(config.model.vocab_size)))
    model_cfg = ModelConfig.of(config.model)
    if model_cfg.modality_weights == "untied" and model_cfg.untied_init == "copy":
        # Image twins the source lacks start as copies of their (loaded) text weights.
        copied = [n for n in report["new"] if image_twin_of(tuple(n.split("."))) is not None]
        params = jax.tree.map(lambda fresh, new: jax.device_put(new, fresh.sharding), params,
                              copy_text_to_image(params, set(copied)))
        report["copied_from_text"] = copied
    state = dict(state, params=params)
    if "ema_params" in state:  # a copy: the step donates the state's buffers
        state["ema_params"] = jax.tree.map(jnp.copy, params)
    report.update(init_from=os.path.abspath(path), step=step, entry=entry)
    _log.info("warm start from %s (step %d, %s): loaded %d tensors (%d params), new %d "
              "(%d params)%s%s%s", path, step, entry, len(report["loaded"]),
              report["loaded_params"], len(report["new"]), report["new_params"],
              f": {', '.join(report['new'])}" if report["new"] else "",
              f"; {'; '.join(report['vocab_rows'])}" if report["vocab_rows"] else "",
              f"; source params unused: {', '.join(report['source_unused'])}"
              if report["source_unused"] else "")
    if report.get("copied_from_text"):
        _log.info("warm start: %d untied image twins copied from their text weights "
                  "(model.untied_init=copy)", len(report["copied_from_text"]))
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, REPORT_FILE), "w") as f:
            json.dump(report, f, indent=1)
    return state
