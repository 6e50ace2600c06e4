"""diffusers-format weights <-> our modules: config.json + diffusion_pytorch_model.safetensors.

Our attribute names are diffusers' module names, so a state-dict key maps onto a
parameter path by renaming the leaf and a few legacy names:
  <module>.weight -> kernel (conv OIHW -> HWIO; linear [out, in] -> [in, out]) or
                     scale (GroupNorm); a bare parameter (the VQ codebook) as is
  attentions.0.to_out.0 -> attentions.0.to_out (diffusers wraps it with a dropout)
  attentions.0.{query,key,value,proj_attn} -> to_q, to_k, to_v, to_out (old files)
Every key must land on a parameter of the right shape and every parameter must be
set, otherwise loading raises WeightsError naming the file and the offending
safetensors keys (with both shapes where a shape differs).
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

import tfusion.autoencoders.safetensors_io as safetensors_io
from tfusion.autoencoders.autoencoder_kl import AutoencoderKL
from tfusion.autoencoders.config import AutoencoderConfig, from_diffusers_dict
from tfusion.autoencoders.vq import VQModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out"}


class WeightsError(ValueError):
    """A weights directory does not fit the model it describes; names the file and tensors."""


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
    """The parameter a diffusers key names, and our leaf name for it; LookupError when
    the key names none."""
    path, leaf = _module_path(key)
    try:
        node = _lookup(model, path)
        if isinstance(node, nnx.Variable) and leaf == "weight":
            var, name = node, path[-1]
        elif leaf == "bias":
            var, name = node.bias, "bias"
        elif leaf == "weight":
            name = "kernel" if hasattr(node, "kernel") else "scale"
            var = getattr(node, name)
        else:
            raise LookupError(key)
    except (AttributeError, IndexError, TypeError) as e:
        raise LookupError(key) from e
    if not isinstance(var, nnx.Param):
        raise LookupError(key)
    return var, name


def _diffusers_axes(name: str, ndim: int) -> tuple[int, ...] | None:
    """The transpose taking our parameter to diffusers' layout; None where they agree."""
    if name != "kernel":
        return None
    # conv HWIO -> OIHW; linear [in, out] -> torch's [out, in]
    return {4: (3, 2, 0, 1), 2: (1, 0)}.get(ndim)


def _diffusers_shape(shape: tuple[int, ...], name: str) -> tuple[int, ...]:
    axes = _diffusers_axes(name, len(shape))
    return tuple(shape) if axes is None else tuple(shape[a] for a in axes)


def _to_ours(array: np.ndarray, name: str) -> np.ndarray:
    axes = _diffusers_axes(name, array.ndim)
    return array if axes is None else array.transpose(np.argsort(axes))


def _to_diffusers(array: np.ndarray, name: str) -> np.ndarray:
    axes = _diffusers_axes(name, array.ndim)
    return array if axes is None else array.transpose(axes)


def _diffusers_key(path: tuple) -> str:
    """Our parameter path -> its diffusers state-dict key (inverse of _module_path)."""
    names = [str(p) for p in path]
    if names[-1] in ("kernel", "scale"):
        names[-1] = "weight"
    elif names[-1] != "bias":
        names.append("weight")  # a bare parameter (codebook embedding)
    if "to_out" in names:
        names.insert(names.index("to_out") + 1, "0")
    return ".".join(names)


def load_state_dict(model: nnx.Module, tensors: dict[str, np.ndarray],
                    source: str = "the tensors") -> None:
    """Copies diffusers-named tensors into `model` in place (float32). Any key that names
    no parameter, any shape that differs from the model's and any parameter the tensors
    leave unset raises WeightsError naming `source` (the file) and the keys."""
    # Keyed by the module's own Variable objects, which _resolve returns too.
    unset = {id(_lookup(model, path)): _diffusers_key(path)
             for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    set_by: dict[int, str] = {}
    problems = []
    for key, array in tensors.items():
        try:
            var, name = _resolve(model, key)
        except LookupError:
            problems.append(f"unexpected key {key}: the model has no such parameter")
            continue
        unset.pop(id(var), None)  # a wrong shape is reported as such, not also as missing
        expected = _diffusers_shape(tuple(var.shape), name)
        shape = tuple(array.shape)
        if name == "kernel" and len(expected) == 2 and shape[2:] == (1, 1):
            shape = shape[:2]  # an attention projection stored as a 1x1 conv (old files)
        if shape != expected:
            problems.append(f"{key}: shape {tuple(array.shape)} in the file, the model "
                            f"expects {expected}")
            continue
        if id(var) in set_by:  # e.g. both the legacy and the current attention name
            problems.append(f"{key}: sets the same parameter as {set_by[id(var)]}")
            continue
        var.value = jnp.asarray(_to_ours(np.asarray(array, np.float32).reshape(shape), name))
        set_by[id(var)] = key
    problems += [f"missing parameter {key}: no tensor of that name" for key in unset.values()]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise WeightsError(f"{source}: {len(problems)} tensor(s) do not match the "
                           f"{type(model).__name__}:\n  {shown}{more}")


def state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """Our parameters under diffusers' names and layouts."""
    return {_diffusers_key(path): _to_diffusers(np.asarray(var.value), str(path[-1]))
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def tensor_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """The key and shape of every tensor a weights file for `model` holds (diffusers'
    names and layouts); works on an abstract (nnx.eval_shape) model."""
    return {_diffusers_key(path): _diffusers_shape(tuple(var.shape), str(path[-1]))
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def model_class(class_name: str):
    return VQModel if class_name == "VQModel" else AutoencoderKL


def read_config(directory: str) -> tuple[AutoencoderConfig, str]:
    """(architecture config, diffusers class name) of a weights directory."""
    path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(path) as f:
            raw = json.load(f)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        return from_diffusers_dict(raw), raw.get("_class_name", "AutoencoderKL")
    except OSError as e:
        raise WeightsError(f"{path}: cannot read: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from e
    except (ValueError, TypeError) as e:  # bad JSON, an unsupported or ill-typed field
        raise WeightsError(f"{path}: {e}") from e


def load_pretrained(directory: str, dtype: str = "float32"):
    """AutoencoderKL or VQModel (by config.json's _class_name) with the directory's weights."""
    cfg, class_name = read_config(directory)
    cls = model_class(class_name)
    # Abstract init: no random weights are computed only to be overwritten.
    model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    path = os.path.join(directory, WEIGHTS_FILE)
    load_state_dict(model, safetensors_io.load(path), source=path)
    return model


def save_pretrained(model, directory: str) -> None:
    """Writes a directory that both `load_pretrained` and diffusers' from_pretrained read."""
    os.makedirs(directory, exist_ok=True)
    class_name = "VQModel" if isinstance(model, VQModel) else "AutoencoderKL"
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(model.cfg.to_diffusers_dict(class_name), f, indent=2)
    safetensors_io.save(os.path.join(directory, WEIGHTS_FILE), state_dict(model),
                        metadata={"format": "pt"})
