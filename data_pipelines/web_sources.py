"""The web-scale sources: sharded files (data_pipelines/shards.py) -> raw records.

  text files   .txt (a document per non-empty line), .jsonl / .jsonl.gz (the
               `text_column` key of each object), .parquet (the `text_column` column),
               .array_record of pre-tokenized documents (TOKENS_MAGIC + little-endian
               int32 ids of the run's tokenizer, no BOS/EOS: `write_token_shard`)
  webdataset   .tar shards as img2dataset writes them: per sample key, the image
               member by extension (IMAGE_EXTENSIONS, first present wins) and the
               caption from the `.txt` member or the `caption_column` (then "text")
               key of the `.json` member
  parquet      the Hugging Face datasets layout: `image_column` holding encoded
               bytes or a {"bytes": ..., "path": ...} struct, `caption_column` (or
               "text") the caption
  interleaved  OBELICS / MMC4-style documents, parquet rows or jsonl objects with a
               `texts` and an `images` list of equal length in reading order, each
               position holding a text or an image (the other one null); images as
               bytes, {"bytes": ...} structs, or file names relative to the shard

A record that cannot be used becomes an error record (counted downstream by reason,
with its shard and key, line or row as origin), never an exception.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

from data_pipelines.file_sources import json_object
from data_pipelines.records import ImageCaptionRecord, InterleavedRecord, TextRecord
from data_pipelines.paths import expand, open_binary
from data_pipelines.shards import ShardedRecords, ShardedView

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
FALLBACK_CAPTION = "text"  # caption column / JSON key tried when caption_column is absent
TOKENS_MAGIC = b"TFT1"  # a pre-tokenized document: magic, then int32 LE token ids


def write_token_shard(path: str, documents) -> None:
    """Writes token-id documents (sequences of ints, no BOS/EOS) as one .array_record
    shard of the text source."""
    import numpy as np
    from array_record.python import array_record_module

    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for ids in documents:
        writer.write(TOKENS_MAGIC + np.asarray(ids, "<i4").tobytes())
    writer.close()


def _token_record(raw: bytes, origin: str) -> TextRecord:
    import numpy as np

    body = raw[len(TOKENS_MAGIC):]
    if not raw.startswith(TOKENS_MAGIC) or len(body) % 4:
        return TextRecord(None, error="bad_token_record", origin=origin,
                          error_detail=f"{len(raw)} bytes, not {TOKENS_MAGIC!r} + int32 ids")
    return TextRecord(np.frombuffer(body, "<i4").astype(np.int32), origin=origin)


def _is_json_lines(path: str) -> bool:
    return path.lower().endswith((".jsonl", ".json", ".jsonl.gz"))


# --- text ---

def _text_record(item: Any, path: str, origin: str, column: str) -> TextRecord:
    if isinstance(item, dict):  # a parquet row
        if item.get(column) is None:
            return TextRecord(None, error="missing_text", origin=origin,
                              error_detail=f"column {column!r} is null")
        return TextRecord(item[column], origin=origin)
    if path.lower().endswith(".array_record"):
        return _token_record(item, origin)
    if not _is_json_lines(path):
        return TextRecord(item, origin=origin)
    meta, problem = json_object(item)
    if meta is not None and column not in meta:
        problem = f"no {column!r} key; keys found: {list(meta)}"
    if problem:
        return TextRecord(None, error="bad_metadata_line", error_detail=problem, origin=origin)
    return TextRecord(meta[column], origin=origin)


def _text_error(reason: str, detail: str, origin: str) -> TextRecord:
    return TextRecord(None, error=reason, error_detail=detail, origin=origin)


def text_records(pattern: str, column: str, block: int) -> ShardedView:
    return ShardedView(ShardedRecords(expand(pattern),
                                      functools.partial(_text_record, column=column),
                                      _text_error, block, parquet_columns=(column,)))


# --- image-caption pairs ---

def _image_error(reason: str, detail: str, origin: str) -> ImageCaptionRecord:
    return ImageCaptionRecord(None, None, error=reason, error_detail=detail, origin=origin)


def _caption(values: dict, column: str):
    for key in (column, FALLBACK_CAPTION):
        if values.get(key) is not None:
            return values[key]
    return None


def _webdataset_record(item, path: str, origin: str, caption_column: str
                       ) -> ImageCaptionRecord:
    del path
    _, members = item
    extension = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if extension is None:
        return _image_error("missing_image_member", f"members: {sorted(members)}", origin)
    caption = members.get("txt")
    if caption is None and "json" in members:
        meta, problem = json_object(members["json"])
        if meta is None:
            return _image_error("bad_metadata_json", problem, origin)
        caption = _caption(meta, caption_column)
    if caption is None:
        return _image_error("missing_caption", f"no .txt member and no {caption_column!r} "
                            f"key in .json; members: {sorted(members)}", origin)
    return ImageCaptionRecord(members[extension], caption, origin=origin)


def webdataset_records(pattern: str, caption_column: str, block: int) -> ShardedView:
    return ShardedView(ShardedRecords(
        expand(pattern), functools.partial(_webdataset_record, caption_column=caption_column),
        _image_error, block))


def image_bytes(value: Any, path: str) -> tuple[Optional[bytes], str]:
    """(encoded bytes, "") or (None, why) from a parquet / jsonl image entry."""
    if isinstance(value, dict):  # Hugging Face datasets' Image feature
        if value.get("bytes") is not None:
            return bytes(value["bytes"]), ""
        value = value.get("path")
        if value is None:
            return None, "image struct with neither bytes nor path"
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), ""
    if isinstance(value, str):  # a file name relative to the shard's directory
        directory = path.rsplit("/", 1)[0] if "/" in path else "."
        try:
            with open_binary(f"{directory}/{value}") as f:
                return f.read(), ""
        except OSError as e:
            return None, f"{value}: {type(e).__name__}: {e}"
    return None, f"image entry holds {type(value).__name__}"


def _parquet_record(row: dict, path: str, origin: str, image_column: str,
                    caption_column: str) -> ImageCaptionRecord:
    if row.get(image_column) is None:
        return _image_error("missing_image", f"column {image_column!r} is null or absent",
                            origin)
    data, problem = image_bytes(row[image_column], path)
    if data is None:
        return _image_error("missing_image", problem, origin)
    caption = _caption(row, caption_column)
    if caption is None:
        return _image_error("missing_caption", f"columns {caption_column!r} and "
                            f"{FALLBACK_CAPTION!r} null or absent", origin)
    return ImageCaptionRecord(data, caption, origin=origin)


def parquet_records(pattern: str, image_column: str, caption_column: str,
                    block: int) -> ShardedView:
    record = functools.partial(_parquet_record, image_column=image_column,
                               caption_column=caption_column)
    return ShardedView(ShardedRecords(expand(pattern), record, _image_error, block,
                                      parquet_columns=(image_column, caption_column,
                                                       FALLBACK_CAPTION)))


# --- interleaved documents ---

def _interleaved_error(reason: str, detail: str, origin: str) -> InterleavedRecord:
    return InterleavedRecord(None, error=reason, error_detail=detail, origin=origin)


def _interleaved_record(item: Any, path: str, origin: str, texts_column: str,
                        images_column: str) -> InterleavedRecord:
    row = item
    if not isinstance(item, dict):  # a jsonl line
        row, problem = json_object(item)
        if row is None:
            return _interleaved_error("bad_metadata_line", problem, origin)
    texts, images = row.get(texts_column), row.get(images_column)
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        return _interleaved_error(
            "bad_interleaved_row", f"needs lists {texts_column!r} and {images_column!r} of "
            f"equal length; got {type(texts).__name__} and {type(images).__name__}", origin)
    parts = []
    for i, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None):
            return _interleaved_error("bad_interleaved_row", f"position {i} holds "
                                      f"{'both a text and an image' if text else 'nothing'}",
                                      origin)
        if text is not None:
            parts.append(("text", text))
            continue
        data, problem = image_bytes(image, path)
        if data is None:
            return _interleaved_error("missing_image", f"position {i}: {problem}", origin)
        parts.append(("image", data))
    return InterleavedRecord(parts, origin=origin)


def interleaved_records(pattern: str, texts_column: str, images_column: str,
                        block: int) -> ShardedView:
    record = functools.partial(_interleaved_record, texts_column=texts_column,
                               images_column=images_column)
    return ShardedView(ShardedRecords(expand(pattern), record, _interleaved_error, block,
                                      parquet_columns=(texts_column, images_column)))
