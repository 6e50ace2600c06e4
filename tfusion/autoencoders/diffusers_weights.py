"""diffusers-format weights <-> our modules: config.json + diffusion_pytorch_model.safetensors.

Our attribute names are diffusers' module names, so a state-dict key maps onto a
parameter path by renaming the leaf and a few legacy names:
  <module>.weight -> kernel (conv OIHW -> HWIO; linear [out, in] -> [in, out]) or
                     scale (GroupNorm); a bare parameter (the VQ codebook) as is
  attentions.0.to_out.0 -> attentions.0.to_out (diffusers wraps it with a dropout)
  attentions.0.{query,key,value,proj_attn} -> to_q, to_k, to_v, to_out (old files)
Every key must land on a parameter of the right shape and every parameter must be
set, otherwise loading fails with the offending names.
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tfusion.autoencoders import safetensors_io
from tfusion.autoencoders.autoencoder_kl import AutoencoderKL
from tfusion.autoencoders.config import AutoencoderConfig, from_diffusers_dict
from tfusion.autoencoders.vq import VQModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out"}


def _module_path(key: str) -> tuple[tuple, str]:
    """'encoder.down_blocks.0.resnets.1.conv1.weight' -> (('encoder', 'down_blocks', 0,
    'resnets', 1, 'conv1'), 'weight')."""
    *parts, leaf = key.split(".")
    path: list = []
    for part in parts:
        if part == "0" and path and path[-1] == "to_out":
            continue
        if len(path) >= 2 and path[-2] == "attentions":
            part = _LEGACY_ATTENTION.get(part, part)
        path.append(int(part) if part.isdigit() else part)
    return tuple(path), leaf


def _lookup(model: nnx.Module, path: tuple):
    node = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def _resolve(model: nnx.Module, key: str) -> tuple[nnx.Variable, str]:
    """The parameter a diffusers key names, and our leaf name for it."""
    path, leaf = _module_path(key)
    node = _lookup(model, path)
    if isinstance(node, nnx.Variable) and leaf == "weight":
        return node, path[-1]
    if leaf == "bias":
        return node.bias, "bias"
    name = "kernel" if hasattr(node, "kernel") else "scale"
    return getattr(node, name), name


def _to_ours(array: np.ndarray, name: str, ndim: int) -> np.ndarray:
    if name != "kernel":
        return array
    if ndim == 4:
        return array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if array.ndim == 4:  # an attention projection stored as a 1x1 conv
        array = array.reshape(array.shape[:2])
    return array.T  # torch Linear [out, in] -> [in, out]


def _to_diffusers(array: np.ndarray, name: str) -> np.ndarray:
    if name != "kernel":
        return array
    return array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T


def load_state_dict(model: nnx.Module, tensors: dict[str, np.ndarray]) -> None:
    """Copies diffusers-named tensors into `model` in place (float32)."""
    params = {id(_lookup(model, path)): ".".join(map(str, path))
              for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    problems = []
    for key, array in tensors.items():
        try:
            var, name = _resolve(model, key)
        except (AttributeError, IndexError, TypeError):
            problems.append(f"unexpected key {key}")
            continue
        value = _to_ours(np.asarray(array, np.float32), name, len(var.shape))
        if value.shape != tuple(var.shape):
            problems.append(f"{key}: shape {array.shape} does not fit {tuple(var.shape)}")
            continue
        var.value = jnp.asarray(value)
        params.pop(id(var), None)
    problems += [f"missing parameter {name}" for name in params.values()]
    if problems:
        raise ValueError("weights do not match the model:\n  " + "\n  ".join(problems[:20]))


def state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """Our parameters under diffusers' names and layouts."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = [str(p) for p in path]
        if names[-1] in ("kernel", "scale"):
            names[-1] = "weight"
        elif names[-1] != "bias":
            names.append("weight")  # a bare parameter (codebook embedding)
        if "to_out" in names:
            names.insert(names.index("to_out") + 1, "0")
        out[".".join(names)] = _to_diffusers(np.asarray(var.value), str(path[-1]))
    return out


def model_class(class_name: str):
    return VQModel if class_name == "VQModel" else AutoencoderKL


def read_config(directory: str) -> tuple[AutoencoderConfig, str]:
    """(architecture config, diffusers class name) of a weights directory."""
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        raw = json.load(f)
    return from_diffusers_dict(raw), raw.get("_class_name", "AutoencoderKL")


def load_pretrained(directory: str, dtype: str = "float32"):
    """AutoencoderKL or VQModel (by config.json's _class_name) with the directory's weights."""
    cfg, class_name = read_config(directory)
    cls = model_class(class_name)
    # Abstract init: no random weights are computed only to be overwritten.
    model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    load_state_dict(model, safetensors_io.load(os.path.join(directory, WEIGHTS_FILE)))
    return model


def save_pretrained(model, directory: str) -> None:
    """Writes a directory that both `load_pretrained` and diffusers' from_pretrained read."""
    os.makedirs(directory, exist_ok=True)
    class_name = "VQModel" if isinstance(model, VQModel) else "AutoencoderKL"
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(model.cfg.to_diffusers_dict(class_name), f, indent=2)
    safetensors_io.save(os.path.join(directory, WEIGHTS_FILE), state_dict(model),
                        metadata={"format": "pt"})
