"""diffusers-format weight files without torch: round trip, legacy names, bf16, errors."""
import os

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from tfusion.autoencoders import AutoencoderKL, VQModel, load_pretrained, save_pretrained
from tfusion.autoencoders import diffusers_weights, safetensors_io

from tests.helpers.autoencoders import TINY_AUTOENCODER as TINY


def _params(model):
    return {path: np.asarray(v.value) for path, v in
            nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("cls", [AutoencoderKL, VQModel])
def test_save_load_round_trip_is_exact(cls, tmp_path):
    model = cls(TINY, rngs=nnx.Rngs(0))
    save_pretrained(model, str(tmp_path))
    loaded = load_pretrained(str(tmp_path))
    assert type(loaded) is cls and loaded.cfg.downsample_factor == 2
    a, b = _params(model), _params(loaded)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))


def test_diffusers_names_and_layouts():
    tensors = diffusers_weights.state_dict(AutoencoderKL(TINY, rngs=nnx.Rngs(0)))
    assert tensors["encoder.down_blocks.0.resnets.0.norm1.weight"].shape == (8,)
    assert tensors["encoder.conv_in.weight"].shape == (8, 3, 3, 3)  # OIHW
    assert tensors["encoder.down_blocks.0.downsamplers.0.conv.weight"].shape == (8, 8, 3, 3)
    assert tensors["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"].shape == (8, 16, 1, 1)
    assert "decoder.mid_block.attentions.0.to_out.0.weight" in tensors
    assert tensors["quant_conv.weight"].shape == (8, 8, 1, 1)
    assert len(tensors) == len(_params(AutoencoderKL(TINY, rngs=nnx.Rngs(0))))


def test_legacy_attention_names_and_bf16(tmp_path):
    model = AutoencoderKL(TINY, rngs=nnx.Rngs(0))
    save_pretrained(model, str(tmp_path))
    path = os.path.join(str(tmp_path), diffusers_weights.WEIGHTS_FILE)
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in safetensors_io.load(path).items():
        for new, old in legacy.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        renamed[key] = value.astype(ml_dtypes.bfloat16)
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in renamed
    safetensors_io.save(path, renamed)
    loaded = _params(load_pretrained(str(tmp_path)))
    for key, value in _params(model).items():
        np.testing.assert_allclose(loaded[key], value, rtol=1e-2, atol=1e-6, err_msg=str(key))


def test_mismatched_weights_fail_with_names(tmp_path):
    save_pretrained(AutoencoderKL(TINY, rngs=nnx.Rngs(0)), str(tmp_path))
    path = os.path.join(str(tmp_path), diffusers_weights.WEIGHTS_FILE)
    tensors = safetensors_io.load(path)
    tensors.pop("decoder.conv_out.bias")
    tensors["encoder.extra.weight"] = np.zeros(3, np.float32)
    tensors["quant_conv.weight"] = np.zeros((4, 8, 1, 1), np.float32)
    safetensors_io.save(path, tensors)
    with pytest.raises(ValueError) as err:
        load_pretrained(str(tmp_path))
    message = str(err.value)
    for fragment in ("missing parameter decoder.conv_out.bias", "unexpected key encoder.extra",
                     "quant_conv.weight: shape (4, 8, 1, 1)"):
        assert fragment in message
