"""File-backed sources: image folder + captions.jsonl, edit folder, ArrayRecord files.
(Sharded web formats and text corpora: data_pipelines/web_sources.py.)

Every line / record becomes exactly one raw record; a record that cannot be read
becomes a record with `error` set (counted downstream), never an exception. Each
record's `origin` names its file and line, so skip examples point at the culprit.

Image folder: `<data_dir>/captions.jsonl`, one JSON object per line, e.g.
  {"file": "a.png", "caption": "a red circle"}
The image file (relative to data_dir) is read from the first of IMAGE_KEYS present:
"file", "file_name" (Hugging Face imagefolder's metadata.jsonl layout), "image",
"path"; the caption from the first of CAPTION_KEYS present: "caption", "text".
`folder_problem` checks the first PROBE_LINES lines at start-up, so a folder whose
lines use other keys is refused before training rather than skipped record by record.

Edit folder: `<data_dir>/edits.jsonl`, one JSON object per line,
  {"input": "in/0.png", "instruction": "make the red circle blue", "output": "out/0.png"}
(image files relative to data_dir), the layout of InstructPix2Pix-style editing sets
once their images are written out as files.

Folders may be remote (gs://, s3://, any fsspec URL: data_pipelines/shards.py
open_binary); ArrayRecord files are local (array_record reads local paths).
"""
from __future__ import annotations

import itertools
import json
import os
import struct
from typing import Optional

import grain

from data_pipelines.records import EditRecord, ImageCaptionRecord
from data_pipelines.paths import expand, exists, open_binary

CAPTIONS_FILE = "captions.jsonl"
IMAGE_KEYS = ("file", "file_name", "image", "path")  # first present wins
CAPTION_KEYS = ("caption", "text")  # first present wins
PROBE_LINES = 20  # non-empty captions.jsonl lines checked at start-up


def _numbered_lines(path: str) -> list[tuple[int, bytes]]:
    """(1-based line number, line) of every non-empty line."""
    with open_binary(path) as f:
        lines = f.read().split(b"\n")
    return [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]


def _quoted(keys) -> str:
    return ", ".join(repr(k) for k in keys)


def json_object(line: bytes) -> tuple[Optional[dict], str]:
    """(object, "") or (None, why the line is not a JSON object)."""
    try:
        value = json.loads(line)
    except ValueError as e:
        return None, f"not JSON ({e})"
    if not isinstance(value, dict):
        return None, f"not a JSON object but {type(value).__name__}"
    return value, ""


def _first_key(meta: dict, keys) -> Optional[str]:
    return next((k for k in keys if k in meta), None)


# --- image folder ---

def _image_name(meta: dict) -> tuple[Optional[str], str]:
    """(file name, "") or (None, why the metadata names no image file)."""
    key = _first_key(meta, IMAGE_KEYS)
    if key is None:
        return None, (f"no image key (looked for {_quoted(IMAGE_KEYS)}); "
                      f"keys found: {list(meta)}")
    if not isinstance(meta[key], str):
        return None, f"{key!r} holds {type(meta[key]).__name__}, not a file name"
    return meta[key], ""


def _folder_record(directory: str, number: int, line: bytes) -> ImageCaptionRecord:
    where = f"{CAPTIONS_FILE} line {number}"
    meta, problem = json_object(line)
    name, problem = _image_name(meta) if meta is not None else (None, problem)
    if name is None:
        return ImageCaptionRecord(None, None, error="bad_metadata_line", error_detail=problem,
                                  origin=where)
    caption_key = _first_key(meta, CAPTION_KEYS)
    caption = meta[caption_key] if caption_key else None
    origin = f"{name} ({where})"
    try:
        with open_binary(os.path.join(directory, name)) as f:
            return ImageCaptionRecord(f.read(), caption, origin=origin)
    except OSError as e:
        return ImageCaptionRecord(None, caption, error="missing_image_file",
                                  error_detail=f"{type(e).__name__}: {e.strerror}", origin=origin)


def folder_records(directory: str) -> grain.MapDataset:
    lines = _numbered_lines(os.path.join(directory, CAPTIONS_FILE))
    return grain.MapDataset.source(lines).map(
        lambda item: _folder_record(directory, *item))


def _probe_objects(path: str) -> tuple[int, list[dict]]:
    """(non-empty lines read, JSON objects among them) of the first PROBE_LINES lines."""
    with open_binary(path) as f:
        lines = list(itertools.islice((line for line in f if line.strip()), PROBE_LINES))
    objects = [meta for meta, _ in map(json_object, lines) if meta is not None]
    return len(lines), objects


def folder_problem(directory: str) -> str:
    """Why `directory` cannot serve the folder source, judged from its first
    PROBE_LINES captions.jsonl lines; "" if it can."""
    path = os.path.join(directory, CAPTIONS_FILE)
    if not exists(path):
        return f"{path} not found (the folder source reads images named in {CAPTIONS_FILE})"
    read, objects = _probe_objects(path)
    if not objects:
        return (f"none of the first {read} non-empty lines of {path} is a JSON object "
                f"(expected e.g. {{\"file\": \"a.png\", \"caption\": \"...\"}})")
    keys = list(dict.fromkeys(k for meta in objects for k in meta))  # first-seen order
    for role, accepted in (("image", IMAGE_KEYS), ("caption", CAPTION_KEYS)):
        if not any(_first_key(meta, accepted) for meta in objects):
            return (f"{CAPTIONS_FILE} lines name the {role} under one of {_quoted(accepted)}; "
                    f"the first {read} lines have keys {keys}")
    return ""


# --- edit folder ---

EDITS_FILE = "edits.jsonl"
EDIT_KEYS = ("input", "instruction", "output")


def _read_bytes(directory: str, name) -> tuple[Optional[bytes], str]:
    if not isinstance(name, str):
        return None, f"image entry holds {type(name).__name__}, not a file name"
    try:
        with open_binary(os.path.join(directory, name)) as f:
            return f.read(), ""
    except OSError as e:
        return None, f"{name}: {type(e).__name__}: {e.strerror}"


def _edit_record(directory: str, number: int, line: bytes) -> EditRecord:
    where = f"{EDITS_FILE} line {number}"
    meta, problem = json_object(line)
    if meta is not None and not all(k in meta for k in EDIT_KEYS):
        meta, problem = None, f"needs keys {_quoted(EDIT_KEYS)}; found {list(meta)}"
    if meta is None:
        return EditRecord(None, None, None, error="bad_metadata_line", error_detail=problem,
                          origin=where)
    images = [_read_bytes(directory, meta[k]) for k in ("input", "output")]
    missing = "; ".join(why for data, why in images if data is None)
    return EditRecord(images[0][0], meta["instruction"], images[1][0],
                      error="missing_image_file" if missing else "", error_detail=missing,
                      origin=where)


def edit_folder_records(directory: str) -> grain.MapDataset:
    path = os.path.join(directory, EDITS_FILE)
    if not exists(path):
        raise FileNotFoundError(f"{path} not found (the edit_folder source reads {EDITS_FILE})")
    return grain.MapDataset.source(_numbered_lines(path)).map(
        lambda item: _edit_record(directory, *item))


# --- ArrayRecord: record = u32 little-endian caption length, caption bytes, image bytes ---

def encode_image_caption(caption: bytes, image: bytes) -> bytes:
    return struct.pack("<I", len(caption)) + caption + image


def decode_image_caption(record: bytes, origin: str = "") -> ImageCaptionRecord:
    if len(record) < 4:
        return ImageCaptionRecord(None, None, error="unreadable_record", origin=origin,
                                  error_detail=f"{len(record)} bytes, shorter than the header")
    (n,) = struct.unpack("<I", record[:4])
    if 4 + n > len(record):
        return ImageCaptionRecord(None, None, error="unreadable_record", origin=origin,
                                  error_detail=f"caption length {n} overruns the "
                                               f"{len(record)}-byte record")
    return ImageCaptionRecord(record[4 + n:], record[4:4 + n], origin=origin)


def write_array_records(path: str, pairs) -> None:
    """Writes (caption bytes, image bytes) pairs in the format this source reads."""
    from array_record.python import array_record_module

    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for caption, image in pairs:
        writer.write(encode_image_caption(caption, image))
    writer.close()


def array_record_records(pattern: str) -> grain.MapDataset:
    source = grain.sources.ArrayRecordDataSource(expand(pattern))
    return grain.MapDataset.source(source).map_with_index(
        lambda i, record: decode_image_caption(record, f"{pattern} record {i}"))
