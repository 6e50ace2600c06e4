"""Precomputed latents: bit-exact ArrayRecord round trip, and the same batches as
encoding on the fly."""
import json
import os
import pathlib

import numpy as np
import pytest
from flax import nnx

from data_pipelines import latents_source
from tfusion.autoencoders import AutoencoderConfig, AutoencoderKL, VQModel, save_pretrained
from tfusion.config import ConfigError

TINY = AutoencoderConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                         norm_num_groups=4, scaling_factor=0.5, shift_factor=0.25,
                         num_vq_embeddings=16)


def test_record_round_trip_is_bit_exact(tmp_path):
    from array_record.python import array_record_module

    rng = np.random.default_rng(0)
    latents = [rng.normal(size=(4, 4, 4)).astype(np.float32) for _ in range(3)]
    latents[1][0, 0, 0] = np.float32(np.nextafter(np.float32(1), np.float32(2)))
    ids = rng.integers(0, 16384, (4, 4, 1)).astype(np.int32)
    path = tmp_path / latents_source.shard_name("train", 0, 1)
    path.parent.mkdir()
    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for i, latent in enumerate(latents):
        writer.write(latents_source.encode_record(f"caption {i}", latent, [{"i": i}]))
    writer.write(latents_source.encode_record(b"ids", ids))
    writer.write(latents_source.encode_record("bad", None, error="corrupt_image"))
    writer.close()
    records = latents_source.records(str(tmp_path), "train")
    assert len(records) == 5
    for i, latent in enumerate(latents):
        got = records[i]
        assert got.latent.dtype == np.float32 and got.caption == f"caption {i}"
        np.testing.assert_array_equal(got.latent.view(np.uint32), latent.view(np.uint32))
        assert got.attributes == [{"i": i}]
    np.testing.assert_array_equal(records[3].latent, ids)
    assert records[3].latent.dtype == np.int32
    assert records[4].error == "corrupt_image" and records[4].latent is None


def _config(encoder_path, tmp_path):
    """shapes_tiny through a 16 px f2c4 VAE. Text documents come from a file: with
    text_source="captions" shapes draws procedural captions while other sources (the
    precomputed one too) reuse their records' captions, so the text streams would differ."""
    from experiments.shapes import shapes_tiny

    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"text document number {i} about shapes" for i in range(20)))
    c = shapes_tiny()
    c.data.update(encoder="vae", encoder_path=encoder_path, num_examples=24, eval_examples=8,
                  shuffle=True, multi_image_fraction=0.2, tokenizer_cache_dir=str(tmp_path),
                  text_source="files", text_files=str(text))
    c.model.update(latent_height=8, latent_width=8, latent_channels=4)  # 16 px, f2
    c.train.batch_size = 4
    return c


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """A random tiny VAE and its latents of shapes (train 24, eval 8), in 2 process shards."""
    from launch.encode_latents import encode_to_directory

    tmp = tmp_path_factory.mktemp("latents")
    weights, out = str(tmp / "vae"), str(tmp / "latents")
    save_pretrained(AutoencoderKL(TINY, rngs=nnx.Rngs(0)), weights)
    config = _config(weights, tmp)
    for process in (1, 0):
        encode_to_directory(config, out, batch_size=4, process_index=process, process_count=2)
    return config, out


def test_metadata_and_shards(encoded):
    config, out = encoded
    meta = latents_source.read_metadata(out)
    assert meta["latent_shape"] == [8, 8, 4] and meta["latent_dtype"] == "float32"
    assert meta["scaling_factor"] == 0.5 and meta["shift_factor"] == 0.25
    assert meta["autoencoder"]["latent_channels"] == 4
    assert meta["num_examples"] == {"train": 24, "eval": 8}
    assert sorted(os.listdir(os.path.join(out, "train"))) == [
        "latents-00000-of-00002.array_record", "latents-00001-of-00002.array_record"]
    # Shards hold the source in order: record i is the scaled posterior mean of image i.
    from data_pipelines import sources
    from data_pipelines.images import prepare_image
    from tfusion.autoencoders import jit_encode, load_pretrained

    encode = jit_encode(load_pretrained(config.data.encoder_path))
    live, stored = sources.image_source(config.data, "train"), latents_source.records(out, "train")
    for i in (0, 13, 23):
        pixels = prepare_image(live[i].image, 16)[0]
        np.testing.assert_allclose(stored[i].latent, encode(pixels[None])[0], atol=1e-5)
        assert stored[i].caption == live[i].caption


def test_precomputed_batches_equal_on_the_fly(encoded):
    from data_pipelines.config import validate_data_config
    from data_pipelines.pipeline import make_eval_iterator, make_train_iterator

    live, out = encoded
    pre = _config("", pathlib.Path(out).parent)
    pre.data.update(source="precomputed", encoder="precomputed", encoder_path=out)
    pre.data.tokenizer_cache_dir = live.data.tokenizer_cache_dir
    validate_data_config(live)
    validate_data_config(pre)
    for make in (make_train_iterator, make_eval_iterator):
        a, b = make(live), make(pre)
        for _ in range(2):
            x, y = next(a), next(b)
            assert x.keys() == y.keys()
            for key in x:
                if key == "images":  # batch-1 vs batch-4 convolutions: last-bit differences
                    np.testing.assert_allclose(x[key], y[key], atol=1e-5)
                else:
                    np.testing.assert_array_equal(x[key], y[key], err_msg=key)
            assert np.abs(y["images"]).sum() > 0


def test_config_errors_name_the_field(encoded, tmp_path):
    from data_pipelines.config import validate_data_config

    live, out = encoded
    cases = [
        (dict(encoder="vae", encoder_path=""), "data.encoder_path"),
        (dict(encoder="vae", encoder_path=str(tmp_path)), "data.encoder_path"),
        (dict(encoder="precomputed", encoder_path=out), "data.encoder"),  # source not precomputed
        (dict(image_size=15), "data.image_size"),
    ]
    for overrides, field in cases:
        config = _config(live.data.encoder_path, tmp_path)
        config.data.update(tokenizer_cache_dir=live.data.tokenizer_cache_dir, **overrides)
        with pytest.raises(ConfigError) as err:
            validate_data_config(config)
        assert err.value.field == field, (overrides, err.value)


def test_vq_encoder_writes_token_ids(tmp_path):
    from launch.encode_latents import encode_to_directory

    weights = str(tmp_path / "vq")
    save_pretrained(VQModel(TINY, rngs=nnx.Rngs(0)), weights)
    config = _config(weights, tmp_path)
    config.data.update(encoder="vq", eval_examples=4)
    encode_to_directory(config, str(tmp_path / "ids"), splits=("eval",), batch_size=4)
    meta = json.load(open(tmp_path / "ids" / latents_source.METADATA_FILE))
    assert meta["latent_dtype"] == "int32" and meta["latent_shape"] == [8, 8, 1]
    record = latents_source.records(str(tmp_path / "ids"), "eval")[0]
    assert record.latent.shape == (8, 8, 1) and record.latent.dtype == np.int32
    assert record.latent.max() < 16


def test_webdataset_shards_encode_locally_and_to_a_remote_directory(tmp_path):
    """A sharded source encodes through the same path; a remote --out (fsspec memory://)
    receives the same bytes as a local one; unusable samples are written with their
    error; interleaved documents are refused."""
    import fsspec

    from launch.encode_latents import encode_to_directory
    from tests.helpers import web_shards

    weights = str(tmp_path / "vae")
    save_pretrained(AutoencoderKL(TINY, rngs=nnx.Rngs(0)), weights)
    (tmp_path / "wds").mkdir()
    outcomes = web_shards.write_webdataset(tmp_path / "wds", shards=2, per_shard=8)
    config = _config(weights, tmp_path)
    config.data.update(source="webdataset", data_dir=str(tmp_path / "wds" / "*.tar"),
                       eval_examples=4, shuffle_block=4)
    local = tmp_path / "local"
    stats = encode_to_directory(config, str(local), batch_size=4)
    assert stats["counts"] == {"train": 12, "eval": 4}
    encode_to_directory(config, "memory://latents/run1", batch_size=4)
    fs = fsspec.filesystem("memory")
    for path in local.rglob("*"):
        if path.is_file():
            remote = f"/latents/run1/{path.relative_to(local)}"
            assert fs.cat(remote) == path.read_bytes(), remote
    records = latents_source.records(str(local), "train")
    errors = [records[i].error for i in range(len(records))]
    expected = [o if o else "" for o in outcomes[4:]]
    assert errors == expected  # decode faults (corrupt_image) as prepare_image names them
    config.data.source = "interleaved"
    with pytest.raises(ConfigError, match="data.source"):
        encode_to_directory(config, str(tmp_path / "x"))
