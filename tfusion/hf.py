"""Hugging Face Llama-family checkpoints in and out of tfusion (launch.import_hf,
launch.export_hf).

A Llama / Qwen2 decoder maps onto tfusion's backbone tensor by tensor:

  model.embed_tokens.weight [V, D]           embed [Vpad, D] (rows of new ids: the mean
                                             row; padding rows: 0)
  model.layers.i.self_attn.{q,k,v}_proj      backbone.blocks.attn.qkv.kernel[i]
      .weight [H Dh | Hkv Dh, D] (+ .bias)     [D, Hkv, G + 2, Dh]: per kv head its G
                                             query heads (HF's head h = kv G + g), k, v
  model.layers.i.self_attn.o_proj.weight     backbone.blocks.attn.out.kernel[i] (transposed)
  model.layers.i.mlp.{gate,up}_proj.weight   backbone.blocks.mlp.gate_up.kernel[i] [D, 2, F]
  model.layers.i.mlp.down_proj.weight        backbone.blocks.mlp.down.kernel[i] (transposed)
  model.layers.i.{input,post_attention}_layernorm.weight
                                             backbone.blocks.{attn,mlp}_norm.scale[i]
  model.norm.weight                          final_norm.scale
  lm_head.weight [V, D] (absent when tied)   lm_head.kernel [D, Vpad]

Both use RMSNorm with a plain scale, rotate-half RoPE and SwiGLU, so the text forward
is the same function (tests/model/test_hf_parity.py checks logits against
`transformers`). What does not map (another model_type, activation, attention or
MLP bias layout, RoPE scaling type, sliding windows) is refused by name.
"""
from __future__ import annotations

import json
import os

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}
IMPORT_FILE = "hf_import.json"  # what an imported run came from (export_hf reads it)


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint tfusion cannot take; the message names what."""


# --- config ---------------------------------------------------------------------------

def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise HFCheckpointError(f"{path}: cannot read ({e.strerror or e})") from e


def _rope(hf: dict) -> tuple[float, dict]:
    """(theta, scaling) from either layout: transformers 5's `rope_parameters`, or the
    older top-level `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
    scaling = hf.get("rope_scaling") or params
    return float(theta), scaling


def model_fields(hf: dict) -> dict:
    """tfusion ModelConfig fields of the text backbone from an HF config.json."""
    kind = hf.get("model_type")
    if kind not in SUPPORTED_MODEL_TYPES:
        raise HFCheckpointError(f"model_type {kind!r} is not supported; supported: "
                                f"{SUPPORTED_MODEL_TYPES}")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFCheckpointError(f"hidden_act {hf['hidden_act']!r}: tfusion's MLP is SwiGLU (silu)")
    width, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or width // heads)
    if head_dim * heads != width:
        raise HFCheckpointError(f"head_dim {head_dim} x {heads} heads != hidden_size {width}: "
                                "tfusion's head_dim is hidden_size / num_attention_heads")
    if kind == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise HFCheckpointError("attention_bias / mlp_bias: tfusion's Llama has no such biases")
    if hf.get("use_sliding_window"):
        raise HFCheckpointError("use_sliding_window: tfusion attends over the whole document")
    theta, scaling = _rope(hf)
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type not in ROPE_TYPES:
        raise HFCheckpointError(f"rope scaling type {rope_type!r} is not supported; "
                                f"supported: {tuple(ROPE_TYPES)}")
    fields = dict(width=width, depth=int(hf["num_hidden_layers"]), num_heads=heads,
                  num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                  mlp_hidden=int(hf["intermediate_size"]), rope_theta=theta,
                  norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                  tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                  qkv_bias=kind == "qwen2", rope_scaling=ROPE_TYPES[rope_type])
    if rope_type != "default":
        fields["rope_scaling_factor"] = float(scaling["factor"])
    if rope_type == "llama3":
        fields.update(rope_low_freq_factor=float(scaling["low_freq_factor"]),
                      rope_high_freq_factor=float(scaling["high_freq_factor"]),
                      rope_original_max_positions=int(scaling["original_max_position_embeddings"]))
    return fields


def hf_config(model_cfg, hf_vocab: int, special: dict) -> dict:
    """An HF config.json for tfusion's text backbone (export_hf)."""
    m = model_cfg
    kind = "qwen2" if m.qkv_bias else "llama"
    rope = {"rope_type": {"none": "default", "linear": "linear", "llama3": "llama3"}[m.rope_scaling],
            "rope_theta": float(m.rope_theta)}
    if m.rope_scaling != "none":
        rope["factor"] = float(m.rope_scaling_factor)
    if m.rope_scaling == "llama3":
        rope.update(low_freq_factor=float(m.rope_low_freq_factor),
                    high_freq_factor=float(m.rope_high_freq_factor),
                    original_max_position_embeddings=int(m.rope_original_max_positions))
    out = dict(architectures=["Qwen2ForCausalLM" if kind == "qwen2" else "LlamaForCausalLM"],
               model_type=kind, hidden_size=m.width, intermediate_size=m.mlp_dim,
               num_hidden_layers=m.depth, num_attention_heads=m.num_heads,
               num_key_value_heads=m.kv_heads, head_dim=m.head_dim, hidden_act="silu",
               rms_norm_eps=float(m.norm_eps), vocab_size=int(hf_vocab),
               tie_word_embeddings=bool(m.tie_embeddings), rope_parameters=rope,
               rope_theta=float(m.rope_theta), max_position_embeddings=4096,
               torch_dtype="float32", dtype="float32", **special)
    if m.rope_scaling != "none":
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if kind == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False, sliding_window=None)
    return out


# --- tensors ----------------------------------------------------------------------------

def _layer(i: int, name: str) -> str:
    return f"model.layers.{i}.{name}"


def hf_tensor_names(model_cfg) -> list[str]:
    """Every tensor an HF checkpoint of this backbone holds."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not model_cfg.tie_embeddings:
        names.append("lm_head.weight")
    per_layer = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                 "mlp.down_proj.weight", "input_layernorm.weight",
                 "post_attention_layernorm.weight"]
    if model_cfg.qkv_bias:
        per_layer += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
    return names + [_layer(i, n) for i in range(model_cfg.depth) for n in per_layer]


def hf_shapes(model_cfg, hf_vocab: int) -> dict[str, tuple]:
    m = model_cfg
    d, f, h, kv, dh = m.width, m.mlp_dim, m.num_heads, m.kv_heads, m.head_dim
    per_layer = {"self_attn.q_proj.weight": (h * dh, d), "self_attn.k_proj.weight": (kv * dh, d),
                 "self_attn.v_proj.weight": (kv * dh, d), "self_attn.o_proj.weight": (d, h * dh),
                 "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
                 "mlp.down_proj.weight": (d, f), "input_layernorm.weight": (d,),
                 "post_attention_layernorm.weight": (d,), "self_attn.q_proj.bias": (h * dh,),
                 "self_attn.k_proj.bias": (kv * dh,), "self_attn.v_proj.bias": (kv * dh,)}
    out = {"model.embed_tokens.weight": (hf_vocab, d), "model.norm.weight": (d,),
           "lm_head.weight": (hf_vocab, d)}
    for name in hf_tensor_names(m):
        out.setdefault(name, per_layer.get(name.split(".", 3)[-1]))
    return {n: out[n] for n in hf_tensor_names(m)}


# tfusion's stacked params, each built from these per-layer HF tensors.
STACKED = {
    "backbone.blocks.attn.qkv.kernel": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                        "self_attn.v_proj.weight"),
    "backbone.blocks.attn.qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                      "self_attn.v_proj.bias"),
    "backbone.blocks.attn.out.kernel": ("self_attn.o_proj.weight",),
    "backbone.blocks.mlp.gate_up.kernel": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "backbone.blocks.mlp.down.kernel": ("mlp.down_proj.weight",),
    "backbone.blocks.attn_norm.scale": ("input_layernorm.weight",),
    "backbone.blocks.mlp_norm.scale": ("post_attention_layernorm.weight",),
}


def to_tfusion_layer(name: str, hf: list[np.ndarray], m) -> np.ndarray:
    """One layer's slice of tfusion param `name` from its HF tensors (STACKED order)."""
    d, kv, g, dh = m.width, m.kv_heads, m.num_heads // m.kv_heads, m.head_dim
    if name.endswith("qkv.kernel"):
        q, k, v = hf
        return np.concatenate([q.T.reshape(d, kv, g, dh), k.T.reshape(d, kv, 1, dh),
                               v.T.reshape(d, kv, 1, dh)], axis=2)
    if name.endswith("qkv.bias"):
        q, k, v = hf
        return np.concatenate([q.reshape(kv, g, dh), k.reshape(kv, 1, dh),
                               v.reshape(kv, 1, dh)], axis=1)
    if name.endswith("gate_up.kernel"):
        return np.stack([hf[0].T, hf[1].T], axis=1)
    if name.endswith(("out.kernel", "down.kernel")):
        return hf[0].T
    return hf[0]  # norm scales


def to_hf_layer(name: str, value: np.ndarray, m) -> list[np.ndarray]:
    """Inverse of to_tfusion_layer: the HF tensors (STACKED order) of one layer's slice."""
    d, kv, g, dh = m.width, m.kv_heads, m.num_heads // m.kv_heads, m.head_dim
    if name.endswith("qkv.kernel"):
        q, k, v = value[:, :, :g], value[:, :, g], value[:, :, g + 1]
        return [q.reshape(d, kv * g * dh).T, k.reshape(d, kv * dh).T, v.reshape(d, kv * dh).T]
    if name.endswith("qkv.bias"):
        return [value[:, :g].reshape(-1), value[:, g].reshape(-1), value[:, g + 1].reshape(-1)]
    if name.endswith("gate_up.kernel"):
        return [value[:, 0].T, value[:, 1].T]
    if name.endswith(("out.kernel", "down.kernel")):
        return [value.T]
    return [value]


def vocab_rows(hf_rows: np.ndarray, vocab_size: int, padded: int) -> np.ndarray:
    """[V_hf, D] -> [padded, D]: ids past the checkpoint's rows (BOI/EOI appended) get the
    mean row (the usual start for added tokens: no outsized logits or inputs), padding
    rows 0."""
    out = np.zeros((padded, hf_rows.shape[1]), np.float32)
    out[:len(hf_rows)] = hf_rows
    out[len(hf_rows):vocab_size] = hf_rows.mean(axis=0)
    return out


class HFCheckpoint:
    """A Hugging Face checkpoint directory read one tensor at a time: model.safetensors
    or shards listed by model.safetensors.index.json."""

    def __init__(self, hf_dir: str):
        from tfusion.autoencoders.safetensors_io import SafetensorsReader

        index = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
            weight_map = None
        else:
            raise HFCheckpointError(f"{hf_dir}: no model.safetensors or "
                                    "model.safetensors.index.json")
        self._readers = {}
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        for file in files:
            self._readers[file] = SafetensorsReader(os.path.join(hf_dir, file))
        if weight_map is None:
            weight_map = {n: "model.safetensors" for n in self._readers["model.safetensors"].names}
        self.weight_map = weight_map

    def shape(self, name: str) -> tuple:
        return self._readers[self.weight_map[name]].shape(name)

    def read(self, name: str) -> np.ndarray:
        return np.asarray(self._readers[self.weight_map[name]].read(name), np.float32)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()


def check_tensors(ckpt: HFCheckpoint, model_cfg, hf_vocab: int) -> None:
    """Every tensor the backbone needs is present with its shape (headers only)."""
    for name, shape in hf_shapes(model_cfg, hf_vocab).items():
        if name not in ckpt.weight_map:
            raise HFCheckpointError(f"tensor {name} is missing from the checkpoint")
        if tuple(ckpt.shape(name)) != tuple(shape):
            raise HFCheckpointError(f"tensor {name} has shape {tuple(ckpt.shape(name))}, "
                                    f"the config implies {tuple(shape)}")


def tfusion_tensor(ckpt: HFCheckpoint, name: str, model_cfg, hf_vocab: int) -> np.ndarray:
    """One whole tfusion text param (stacked over layers where it is) from the
    checkpoint, read tensor by tensor."""
    m = model_cfg
    if name == "embed":
        return vocab_rows(ckpt.read("model.embed_tokens.weight"), m.vocab_size,
                          m.padded_vocab_size)
    if name == "lm_head.kernel":
        return vocab_rows(ckpt.read("lm_head.weight"), m.vocab_size, m.padded_vocab_size).T
    if name == "final_norm.scale":
        return ckpt.read("model.norm.weight")
    parts = STACKED[name]
    first = to_tfusion_layer(name, [ckpt.read(_layer(0, p)) for p in parts], m)
    out = np.empty((m.depth,) + first.shape, np.float32)
    out[0] = first
    for i in range(1, m.depth):
        out[i] = to_tfusion_layer(name, [ckpt.read(_layer(i, p)) for p in parts], m)
    return out


def hf_tensors(params_host, model_cfg, hf_vocab: int):
    """(specs [(HF name, shape, float32)], a generator of the arrays in that order) from
    params_host(name) -> one tfusion param on the host; each tfusion param is fetched
    once and its layers emitted together."""
    m = model_cfg
    specs, plan = [], []
    shapes = hf_shapes(m, hf_vocab)
    for name, hf_name in (("embed", "model.embed_tokens.weight"),
                          ("final_norm.scale", "model.norm.weight")) + (
            () if m.tie_embeddings else (("lm_head.kernel", "lm_head.weight"),)):
        specs.append((hf_name, shapes[hf_name], np.float32))
        plan.append((name, None))
    for name, parts in STACKED.items():
        if name.endswith("qkv.bias") and not m.qkv_bias:
            continue
        for i in range(m.depth):
            for p in parts:
                specs.append((_layer(i, p), shapes[_layer(i, p)], np.float32))
        plan.append((name, parts))

    def arrays():
        for name, parts in plan:
            value = np.asarray(params_host(name), np.float32)
            if parts is None:
                if name == "embed":
                    yield value[:hf_vocab]
                elif name == "lm_head.kernel":
                    yield value[:, :hf_vocab].T
                else:
                    yield value
                continue
            for i in range(m.depth):
                yield from to_hf_layer(name, value[i], m)
            del value

    return specs, arrays()
