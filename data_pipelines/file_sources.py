"""File-backed sources: image folder + captions.jsonl, ArrayRecord files, text files.

Every line / record becomes exactly one raw record; a record that cannot be read
becomes a record with `error` set (counted downstream), never an exception.
"""
from __future__ import annotations

import glob
import json
import os
import struct

import grain

from data_pipelines.records import ImageCaptionRecord, TextRecord

CAPTIONS_FILE = "captions.jsonl"


def _read_lines(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        return [line for line in f.read().split(b"\n") if line.strip()]


def _expand(pattern: str) -> list[str]:
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no files match {pattern!r}")
    return paths


# --- image folder: <dir>/captions.jsonl lines {"file": "a.png", "caption": "..."} ---

def _folder_record(directory: str, line: bytes) -> ImageCaptionRecord:
    try:
        meta = json.loads(line)
        name, caption = meta["file"], meta.get("caption")
        path = os.path.join(directory, name)
    except Exception:  # bad JSON, missing key, wrong types
        return ImageCaptionRecord(None, None, error="bad_metadata_line")
    try:
        with open(path, "rb") as f:
            return ImageCaptionRecord(f.read(), caption)
    except OSError:
        return ImageCaptionRecord(None, caption, error="missing_image_file")


def folder_records(directory: str) -> grain.MapDataset:
    lines = _read_lines(os.path.join(directory, CAPTIONS_FILE))
    return grain.MapDataset.source(lines).map(lambda line: _folder_record(directory, line))


# --- ArrayRecord: record = u32 little-endian caption length, caption bytes, image bytes ---

def encode_image_caption(caption: bytes, image: bytes) -> bytes:
    return struct.pack("<I", len(caption)) + caption + image


def decode_image_caption(record: bytes) -> ImageCaptionRecord:
    if len(record) < 4:
        return ImageCaptionRecord(None, None, error="unreadable_record")
    (n,) = struct.unpack("<I", record[:4])
    if 4 + n > len(record):
        return ImageCaptionRecord(None, None, error="unreadable_record")
    return ImageCaptionRecord(record[4 + n:], record[4:4 + n])


def write_array_records(path: str, pairs) -> None:
    """Writes (caption bytes, image bytes) pairs in the format this source reads."""
    from array_record.python import array_record_module

    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for caption, image in pairs:
        writer.write(encode_image_caption(caption, image))
    writer.close()


def array_record_records(pattern: str) -> grain.MapDataset:
    source = grain.sources.ArrayRecordDataSource(_expand(pattern))
    return grain.MapDataset.source(source).map(decode_image_caption)


# --- text: .txt = one document per non-empty line; .jsonl = one object per line ---

def _jsonl_text(line: bytes, key: str) -> TextRecord:
    try:
        return TextRecord(json.loads(line)[key])
    except Exception:
        return TextRecord(None, error="bad_metadata_line")


def text_file_records(pattern: str, jsonl_key: str) -> grain.MapDataset:
    """All lines of all matching files (held in memory: fine for small corpora)."""
    lines, is_jsonl = [], []
    for path in _expand(pattern):
        file_lines = _read_lines(path)
        lines += file_lines
        is_jsonl += [path.endswith(".jsonl")] * len(file_lines)
    items = list(zip(lines, is_jsonl))
    return grain.MapDataset.source(items).map(
        lambda item: _jsonl_text(item[0], jsonl_key) if item[1] else TextRecord(item[0]))
