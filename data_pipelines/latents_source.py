"""The `precomputed` image source: latents written once by launch/encode_latents.py.

Layout of a latents directory (data.encoder_path when data.encoder="precomputed"):

  metadata.json                      encoder name + diffusers config (scale, shift),
                                     latent shape/dtype, image size, source, counts
  train/latents-PPPPP-of-NNNNN.array_record   one file per encoding process; process
  eval/latents-PPPPP-of-NNNNN.array_record    p holds a contiguous index range, so the
                                              sorted files are the source's order

Record = u32 LE header length, JSON header {"caption", "attributes", "error",
"shape", "dtype"}, then the latent's raw little-endian bytes (bit-exact: no
re-encoding). A source record that could not be encoded is kept with "error" set,
so indices (and therefore shuffles and document draws) match the live source.
"""
from __future__ import annotations

import glob
import json
import os
import struct

import grain
import numpy as np

from data_pipelines.records import ImageCaptionRecord

METADATA_FILE = "metadata.json"
FORMAT_VERSION = 1


def shard_name(split: str, process_index: int, process_count: int) -> str:
    return os.path.join(split, f"latents-{process_index:05d}-of-{process_count:05d}.array_record")


def encode_record(caption, latent: np.ndarray | None, attributes=None, error: str = "") -> bytes:
    if isinstance(caption, (bytes, bytearray)):
        caption = bytes(caption).decode("utf-8", errors="replace")
    header = {"caption": caption, "attributes": attributes, "error": error}
    body = b""
    if latent is not None:
        latent = np.ascontiguousarray(latent)
        little = latent.astype(latent.dtype.newbyteorder("<"), copy=False)
        header.update(shape=list(latent.shape), dtype=latent.dtype.name)
        body = little.tobytes()
    raw = json.dumps(header).encode()
    return struct.pack("<I", len(raw)) + raw + body


def decode_record(record: bytes, origin: str = "") -> ImageCaptionRecord:
    try:
        (n,) = struct.unpack("<I", record[:4])
        header = json.loads(record[4:4 + n])
    except Exception as e:  # truncated or foreign record
        return ImageCaptionRecord(None, None, error="unreadable_record", origin=origin,
                                  error_detail=f"{type(e).__name__}: {e}")
    if header.get("error"):
        return ImageCaptionRecord(None, header.get("caption"), error=header["error"],
                                  origin=origin,
                                  error_detail="recorded by launch/encode_latents.py")
    dtype = np.dtype(header["dtype"]).newbyteorder("<")
    latent = np.frombuffer(record[4 + n:], dtype=dtype).reshape(header["shape"])
    return ImageCaptionRecord(None, header["caption"], attributes=header.get("attributes"),
                              latent=latent.astype(dtype.newbyteorder("="), copy=False),
                              origin=origin)


def read_metadata(directory: str) -> dict:
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} missing: not a directory written by "
                                "launch/encode_latents.py")
    with open(path) as f:
        return json.load(f)


def split_files(directory: str, split: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(directory, split, "latents-*.array_record")))
    if not files:
        raise FileNotFoundError(f"no latent shards in {os.path.join(directory, split)}")
    return files


def records(directory: str, split: str) -> grain.MapDataset:
    """ImageCaptionRecords with `latent` set (or `error`), in the encoded source's order."""
    source = grain.sources.ArrayRecordDataSource(split_files(directory, split))
    return grain.MapDataset.source(source).map_with_index(
        lambda i, record: decode_record(record, f"{split} latent record {i}"))
