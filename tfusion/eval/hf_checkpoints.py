"""Hugging Face checkpoints in and out of tfusion runs: `import_hf` (launch.import_hf)
and `export_hf` (launch.export_hf). The tensor mapping is tfusion/hf.py; this module
adds the tokenizer, the run directory and the sharded placement.

import_hf: DIR (config.json, model.safetensors or shards with
model.safetensors.index.json, tokenizer.json + tokenizer_config.json or a sentencepiece
tokenizer.model) becomes a run directory WD: config.json (the experiment with its text
backbone replaced by the checkpoint's: width, depth, heads, GQA, MLP size, RoPE theta
and scaling, norm eps, tied embeddings, Qwen2's q/k/v biases; vocab_size covering the
checkpoint's rows and the tokenizer's ids with BOI/EOI appended), tokenizer/ (a copy,
named by config.data.tokenizer), checkpoints/0/state = {"params": ...} (the text
weights converted, new BOI/EOI rows at the mean row, the image layers freshly
initialised), export.json and hf_import.json: what launch.generate, launch.evaluate
and train.init_from read. Tensors are read one at a time (safetensors headers, then
seek + read) and each tfusion param is placed in its sharding as soon as it is built:
host memory holds about one param (stacked over layers), never the model. Everything
is checked before anything is written (model_type, activation, biases, RoPE scaling,
every tensor's presence and shape, the tokenizer's ids against the config); WD is
written under a temporary name and renamed at the end, so a refusal or a crash leaves
no WD.

export_hf: a run's text model as DIR: config.json (LlamaForCausalLM, or
Qwen2ForCausalLM where the run has q/k/v biases), model.safetensors (float32, streamed:
one tfusion param on the host at a time), the run's tokenizer files, and the image
side: image_layers.safetensors (tfusion's flat names; untied image twins included)
with tfusion_config.json. The vocab rows written are those of the checkpoint the run was imported from
(hf_import.json), else all of model.vocab_size (BOI/EOI included).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json")


def _tokenizer_files(hf_dir: str) -> list[str]:
    from tfusion.hf import HFCheckpointError

    files = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(hf_dir, f))]
    if "tokenizer.json" not in files and "tokenizer.model" not in files:
        raise HFCheckpointError(f"{hf_dir}: no tokenizer.json or tokenizer.model")
    return files


def _check_tokenizer(tokenizer, hf: dict, hf_vocab: int) -> None:
    """The tokenizer's text ids must have rows in the checkpoint and agree with the
    config's special ids."""
    from tfusion.hf import HFCheckpointError

    if tokenizer.base_vocab_size > hf_vocab:
        raise HFCheckpointError(f"the tokenizer has {tokenizer.base_vocab_size} ids, the "
                                f"checkpoint rows for {hf_vocab} only")
    checks = [("eos_token_id", tokenizer.eos_id)]
    if not tokenizer.bos_from_eos:  # a tokenizer with no BOS of its own (Qwen2) has none to check
        checks.append(("bos_token_id", tokenizer.bos_id))
    for name, ours in checks:
        theirs = hf.get(name)
        theirs = theirs[0] if isinstance(theirs, list) else theirs
        if theirs is not None and theirs != ours:
            raise HFCheckpointError(f"config.json {name} = {theirs} but the tokenizer's is {ours}")


def plan(hf_dir: str, base_config):
    """(run config, HF config, tokenizer files, checkpoint): everything checked, nothing
    written. base_config: the experiment config whose text backbone is replaced."""
    import copy

    from data_pipelines.tokenizer import load_tokenizer
    from tfusion.config import ModelConfig
    from tfusion.hf import HFCheckpoint, check_tensors, model_fields, read_hf_config

    hf = read_hf_config(hf_dir)
    fields = model_fields(hf)
    files = _tokenizer_files(hf_dir)
    tok_file = "tokenizer.json" if "tokenizer.json" in files else "tokenizer.model"
    tokenizer = load_tokenizer(os.path.join(hf_dir, tok_file))
    hf_vocab = int(hf["vocab_size"])
    _check_tokenizer(tokenizer, hf, hf_vocab)
    config = copy.deepcopy(base_config)
    config.model.update(fields, vocab_size=max(hf_vocab, tokenizer.vocab_size),
                        padded_vocab_size=0, pad_id=min(tokenizer.pad_id, hf_vocab - 1))
    config.data.tokenizer = os.path.join("tokenizer", tok_file)  # made absolute on write
    model_cfg = ModelConfig.of(config.model)
    ckpt = HFCheckpoint(hf_dir)
    try:
        check_tensors(ckpt, model_cfg, hf_vocab)
    except Exception:
        ckpt.close()
        raise
    return config, hf, files, ckpt


def convert(ckpt, config, hf_vocab: int, seed: int, mesh, table) -> dict:
    """The run's params (pure dict), each placed in its sharding on `mesh` as built."""
    import jax
    from flax import nnx

    from tfusion.config import ModelConfig
    from tfusion.eval.export import flat_names
    from tfusion.hf import tfusion_tensor
    from tfusion.model.transfusion import image_twin_of, make_image_layers
    from tfusion.train.state import abstract_params, to_pure

    model_cfg = ModelConfig.of(config.model)
    abstract = flat_names(abstract_params(config.model, mesh, table))
    encoder, decoder = make_image_layers(model_cfg, nnx.Rngs(seed))
    fresh = flat_names({"image_encoder": to_pure(nnx.state(encoder, nnx.Param)),
                        "image_decoder": to_pure(nnx.state(decoder, nnx.Param))})
    if model_cfg.modality_weights == "untied" and model_cfg.untied_init != "copy":
        raise ValueError("model.untied_init=fresh: an import builds untied image twins as "
                         "copies of the text weights only; import with untied_init=copy")
    flat = {}
    for name, spec in abstract.items():
        twin = image_twin_of(tuple(name.split(".")))  # untied image twin: a text copy
        value = (np.asarray(fresh[name], np.float32) if name in fresh
                 else tfusion_tensor(ckpt, ".".join(twin) if twin else name, model_cfg,
                                     hf_vocab))
        if tuple(value.shape) != tuple(spec.shape):
            raise ValueError(f"{name}: built {value.shape}, the model has {spec.shape}")
        flat[name] = jax.make_array_from_callback(spec.shape, spec.sharding,
                                                  lambda index, v=value: v[index])
        del value
    tree = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def import_hf(hf_dir: str, workdir: str, base_config, seed: int = 0) -> dict:
    """Writes the run directory (see the module docstring); returns hf_import.json's dict."""
    import jax

    from tfusion import sharding
    from tfusion.eval.checkpoints import EXPORT_FILE
    from tfusion.hf import IMPORT_FILE, HFCheckpointError
    from tfusion.train.checkpoint import Checkpointer
    from tfusion.train.metrics import write_config

    if os.path.exists(workdir) and os.listdir(workdir):
        raise HFCheckpointError(f"{workdir} exists and is not empty; choose a new --workdir")
    config, hf, files, ckpt = plan(hf_dir, base_config)
    hf_vocab = int(hf["vocab_size"])
    parent = os.path.dirname(os.path.abspath(workdir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".import_hf_", dir=parent)
    try:
        mesh, table = sharding.make_mesh(config.mesh), sharding.mesh_rules(config.mesh)
        params = convert(ckpt, config, hf_vocab, seed, mesh, table)
        checkpointer = Checkpointer(os.path.join(staging, "checkpoints"), keep=1,
                                    async_save=False)
        try:
            checkpointer.save(0, {"params": params}, None)
        finally:
            checkpointer.close()
        os.makedirs(os.path.join(staging, "tokenizer"))
        for f in files:
            shutil.copyfile(os.path.join(hf_dir, f), os.path.join(staging, "tokenizer", f))
        config.data.tokenizer = os.path.join(os.path.abspath(workdir), config.data.tokenizer)
        write_config(staging, config)
        record = dict(source=os.path.abspath(hf_dir), model_type=hf["model_type"],
                      hf_vocab_size=hf_vocab, vocab_size=int(config.model.vocab_size),
                      tokenizer_files=files, params=len(jax.tree.leaves(params)))
        with open(os.path.join(staging, IMPORT_FILE), "w") as f:
            json.dump(record, f, indent=1)
        with open(os.path.join(staging, EXPORT_FILE), "w") as f:
            json.dump({"params": "raw", "step": 0, "format": "orbax", "source": record["source"],
                       "imported": "hf"}, f, indent=1)
        if os.path.exists(workdir):
            os.rmdir(workdir)  # empty (checked above)
        os.replace(staging, workdir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        ckpt.close()
    return record



def _hf_vocab(workdir: str, model_cfg) -> int:
    from tfusion.hf import IMPORT_FILE

    path = os.path.join(workdir, IMPORT_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return int(json.load(f)["hf_vocab_size"])
    return int(model_cfg.vocab_size)


def _copy_tokenizer(config, out: str) -> dict:
    """Copies the run's tokenizer into `out`; returns the special ids for config.json."""
    from data_pipelines.tokenizer import build_tokenizer, builtin_tokenizer_path, is_json_tokenizer

    tokenizer = build_tokenizer(config)
    path = config.data.tokenizer
    if path == "builtin":
        shutil.copyfile(builtin_tokenizer_path(config.data.tokenizer_vocab_size,
                                               config.data.tokenizer_cache_dir),
                        os.path.join(out, "tokenizer.model"))
    elif is_json_tokenizer(path):
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if os.path.exists(os.path.join(directory, name)):
                shutil.copyfile(os.path.join(directory, name), os.path.join(out, name))
    else:
        shutil.copyfile(path, os.path.join(out, "tokenizer.model"))
    return dict(bos_token_id=int(tokenizer.bos_id), eos_token_id=int(tokenizer.eos_id),
                pad_token_id=int(tokenizer.pad_id))


def export_hf(workdir: str, out: str, params: str = "ema", step=None) -> dict:
    """Writes DIR (see the module docstring); returns a summary."""
    import jax
    import numpy as np

    from tfusion.autoencoders.safetensors_io import save_streamed
    from tfusion.config import ModelConfig
    from tfusion.eval.checkpoints import load_config, restore_params
    from tfusion.eval.export import _host_value, flat_names
    from tfusion.hf import HFCheckpointError, hf_config, hf_tensors

    if os.path.exists(out) and os.listdir(out):
        raise HFCheckpointError(f"{out} exists and is not empty; choose a new --out")
    config = load_config(workdir)
    model_cfg = ModelConfig.of(config.model)
    tree, step, entry = restore_params(workdir, step, config, params)
    flat = flat_names(tree)
    hf_vocab = _hf_vocab(workdir, model_cfg)
    primary = jax.process_index() == 0
    if primary:
        os.makedirs(out, exist_ok=True)
    specs, arrays = hf_tensors(lambda name: _host_value(flat[name]), model_cfg, hf_vocab)
    # The image side: the image layers and, untied, the backbone's image twins.
    image = sorted(n for n in flat if any(k.startswith("image_") for k in n.split(".")))
    if primary:
        save_streamed(os.path.join(out, "model.safetensors"), specs, arrays,
                      {"format": "pt"})
        special = _copy_tokenizer(config, out)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(hf_config(model_cfg, hf_vocab, special), f, indent=1)
        save_streamed(os.path.join(out, "image_layers.safetensors"),
                      [(n, tuple(flat[n].shape), np.float32) for n in image],
                      (_host_value(flat[n]) for n in image),
                      {"format": "tfusion", "params": entry, "step": str(step)})
        with open(os.path.join(out, "tfusion_config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    else:  # join the gathers of tensors sharded over processes, in the same order
        for _ in arrays:
            pass
        for n in image:
            _host_value(flat[n])
    return dict(out=out, step=step, params=entry, tensors=len(specs), hf_vocab_size=hf_vocab)


