"""Encode an image source once into ArrayRecord latent shards (the `precomputed` source).

  python -m launch.encode_latents --config=experiments/registry.py:NAME --out=DIR \\
      --config.data.encoder=vae --config.data.encoder_path=WEIGHTS [--num_examples=N]
      [--process_index=P --process_count=N]

Reads config.data.source through the configured encoder (vae or vq) and writes
DIR/{split}/latents-P-of-N.array_record with the captions, plus DIR/metadata.json
(encoder config incl. scale/shift, latent shape, counts); see
data_pipelines/latents_source.py. Process P encodes the P-th contiguous slice of
each split, so running N copies (one per host) covers the set and keeps its order.
Train with data.source=data.encoder="precomputed", data.encoder_path=DIR. A bad
config field or weights directory exits with an `error: ...` message, no traceback.

Every image-caption source reads here, the sharded ones (webdataset, parquet; local
or remote) included: a process reads its slice in order, block by block. Records that
cannot be used are written with their error and counted when training reads them.
Interleaved documents and edits are not image-caption pairs and are refused. An --out
with a protocol (gs://, s3://, memory://...) is written locally first, then copied
there file by file; the `precomputed` source reads a local copy.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/registry.py:NAME")
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_SPLITS = flags.DEFINE_list("splits", ["train", "eval"], "Splits to encode.")
_NUM_EXAMPLES = flags.DEFINE_integer(
    "num_examples", 0, "Records per split to encode (0 = all; the eval split is always "
    "data.eval_examples). Procedural shapes has data.num_examples train records.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per encoder call.")
_PROCESS_INDEX = flags.DEFINE_integer("process_index", 0, "This process (shard) index.")
_PROCESS_COUNT = flags.DEFINE_integer("process_count", 1, "Number of encoding processes.")


def index_range(total: int, index: int, count: int) -> tuple[int, int]:
    """Contiguous slice [lo, hi) of `total` records for process `index` of `count`."""
    return total * index // count, total * (index + 1) // count


def encode_split(records, lo: int, hi: int, encode_batch, image_size: int, batch_size: int,
                 writer) -> int:
    """Encodes records[lo:hi] in order; unusable ones are written with their error."""
    import numpy as np

    from data_pipelines.images import prepare_image
    from data_pipelines.latents_source import encode_record
    from data_pipelines.records import BadRecord

    pending = []  # (record, pixels or None, error), flushed in index order

    def flush():
        good = [p for _, p, _ in pending if p is not None]
        latents = iter(encode_batch(np.stack(good), batch_size) if good else [])
        for record, pixels, error in pending:
            latent = next(latents) if pixels is not None else None
            writer.write(encode_record(record.caption, latent, record.attributes, error))
        pending.clear()

    for i in range(lo, hi):
        record = records[i]
        pixels, error = None, record.error
        if not error:
            try:
                pixels = prepare_image(record.image, image_size)[0]
            except BadRecord as e:
                error = e.reason
        pending.append((record, pixels, error))
        if len(pending) == batch_size:
            flush()
    flush()
    return hi - lo


def batch_encoder(model):
    """(images [n, px, px, 3], batch) -> latents: padded to `batch` so one compile serves all."""
    import numpy as np

    from tfusion.autoencoders import AutoencoderKL, jit_method

    fn = jit_method(model, "encode" if isinstance(model, AutoencoderKL) else "encode_ids")

    def encode(images, batch):
        n = len(images)
        padded = np.concatenate([images, np.zeros((batch - n, *images.shape[1:]), images.dtype)])
        out = np.asarray(fn(padded))[:n]
        return out[..., None] if out.ndim == 3 else out  # VQ ids [n, h, w] -> [n, h, w, 1]

    return encode


def metadata(config, model, counts: dict, process_count: int) -> dict:
    from data_pipelines.latents_source import FORMAT_VERSION
    from tfusion.autoencoders import AutoencoderKL

    d = config.data
    is_vae = isinstance(model, AutoencoderKL)
    latent_shape = list(model.cfg.latent_shape(d.image_size))
    if not is_vae:
        latent_shape[-1] = 1  # token ids
    return {"format_version": FORMAT_VERSION, "encoder": d.encoder,
            "encoder_path": os.path.abspath(d.encoder_path),
            "autoencoder": model.cfg.to_diffusers_dict("AutoencoderKL" if is_vae else "VQModel"),
            "scaling_factor": model.cfg.scaling_factor, "shift_factor": model.cfg.shift,
            "latent_shape": latent_shape, "latent_dtype": "float32" if is_vae else "int32",
            "image_size": d.image_size, "source": d.source, "num_examples": counts,
            "process_count": process_count}


def encode_to_directory(config, out: str, splits=("train", "eval"), num_examples: int = 0,
                        batch_size: int = 32, process_index: int = 0,
                        process_count: int = 1) -> dict:
    """Writes this process's shards (and, from process 0, metadata.json); returns stats."""
    from array_record.python import array_record_module

    from data_pipelines import sources
    from data_pipelines.latents_source import METADATA_FILE, shard_name
    from tfusion.autoencoders import diffusers_weights
    from tfusion.config import ConfigError

    d = config.data
    if d.encoder not in ("vae", "vq"):
        raise ConfigError("data.encoder", f"encode_latents runs a vae or vq, got {d.encoder!r}")
    if not d.encoder_path:
        raise ConfigError("data.encoder_path", "needs the autoencoder weights directory")
    if d.source in ("none", "precomputed"):
        raise ConfigError("data.source", f"{d.source!r} has no images to encode")
    if d.source in ("interleaved", "shapes_edit", "edit_folder"):
        raise ConfigError("data.source", f"{d.source!r} records are documents with several "
                                         "images, not the image-caption pairs latents store")
    from data_pipelines.paths import is_remote

    if is_remote(out):
        import tempfile

        with tempfile.TemporaryDirectory() as local:
            stats = encode_to_directory(config, local, splits, num_examples, batch_size,
                                        process_index, process_count)
            _upload(local, out)
        return stats
    model = diffusers_weights.load_pretrained(d.encoder_path)
    encode = batch_encoder(model)
    counts, start, encoded = {}, time.time(), 0
    for split in splits:
        records = sources.image_source(d, split)
        total = len(records)
        if split == "train" and num_examples:
            total = min(total, num_examples)
        counts[split] = total
        lo, hi = index_range(total, process_index, process_count)
        path = os.path.join(out, shard_name(split, process_index, process_count))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
        encoded += encode_split(records, lo, hi, encode, d.image_size, batch_size, writer)
        writer.close()
    if process_index == 0:
        with open(os.path.join(out, METADATA_FILE), "w") as f:
            json.dump(metadata(config, model, counts, process_count), f, indent=2)
    elapsed = time.time() - start
    return {"encoded": encoded, "seconds": elapsed, "images_per_s": encoded / elapsed,
            "counts": counts}


def _upload(local: str, remote: str) -> None:
    from data_pipelines.paths import open_binary_write

    for directory, _, files in os.walk(local):
        for name in files:
            path = os.path.join(directory, name)
            target = remote.rstrip("/") + "/" + os.path.relpath(path, local)
            with open(path, "rb") as src, open_binary_write(target) as dst:
                dst.write(src.read())


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from tfusion.autoencoders.diffusers_weights import WeightsError
    from tfusion.autoencoders.safetensors_io import SafetensorsError
    from tfusion.config import ConfigError

    try:
        stats = encode_to_directory(_CONFIG.value, _OUT.value, _SPLITS.value,
                                    _NUM_EXAMPLES.value, _BATCH.value, _PROCESS_INDEX.value,
                                    _PROCESS_COUNT.value)
    except (ConfigError, WeightsError, SafetensorsError) as e:
        sys.exit(f"error: {e}")  # the user's input is wrong: no traceback
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
