"""Reads and writes the safetensors file format with numpy only.

Format (https://github.com/huggingface/safetensors): u64 little-endian header
length, a JSON header {name: {dtype, shape, data_offsets: [begin, end]}} (offsets
relative to the end of the header, plus an optional "__metadata__" of strings),
then the raw little-endian tensor bytes. Our own reader keeps weight loading free
of torch and handles bf16 through ml_dtypes (which jax ships).
"""
from __future__ import annotations

import json
import math
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
    """A file is not a readable safetensors file; the message starts with its path."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path


def _read_header(path: str, data: bytes) -> tuple[dict, memoryview]:
    """(header, tensor bytes) of a whole file, checked to be what the format promises."""
    if len(data) < 8:
        raise SafetensorsError(path, f"not a safetensors file ({len(data)} bytes, shorter "
                                     "than the 8-byte header length)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise SafetensorsError(path, f"not a safetensors file (header length {header_len} "
                                     f"exceeds the file size {len(data)})")
    try:
        header = json.loads(data[8:8 + header_len])
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        header = None
    if not isinstance(header, dict):
        raise SafetensorsError(path, "not a safetensors file (its header is not a JSON object)")
    return header, memoryview(data)[8 + header_len:]


def _tensor(path: str, name: str, info, body: memoryview) -> np.ndarray:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise SafetensorsError(path, f"tensor {name}: its header entry lacks "
                                     "dtype/shape/data_offsets")
    if info["dtype"] not in _DTYPES:
        raise SafetensorsError(path, f"tensor {name} has unsupported dtype {info['dtype']}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)
            and isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(n, int) for n in offsets)):
        raise SafetensorsError(path, f"tensor {name}: malformed shape {shape!r} or "
                                     f"data_offsets {offsets!r}")
    dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
    begin, end = offsets
    size = math.prod(shape) * dtype.itemsize
    if not 0 <= begin <= end <= len(body) or end - begin != size:
        raise SafetensorsError(path, f"tensor {name}: data_offsets {offsets} do not hold "
                                     f"{size} bytes of {info['dtype']} {shape} within the "
                                     f"{len(body)} data bytes (truncated file?)")
    return np.frombuffer(body[begin:end], dtype=dtype).reshape(shape).copy()


def load(path: str) -> dict[str, np.ndarray]:
    """Every tensor of the file; any problem with the file raises SafetensorsError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SafetensorsError(path, f"cannot read: {e.strerror or e}") from e
    header, body = _read_header(path, data)
    return {name: _tensor(path, name, info, body)
            for name, info in header.items() if name != "__metadata__"}


def save(path: str, tensors: Mapping[str, np.ndarray],
         metadata: Mapping[str, str] | None = None) -> None:
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = dict(metadata)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the spec aligns tensor data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for raw in chunks:
            f.write(raw)


class SafetensorsReader:
    """A safetensors file read one tensor at a time (seek + read): host memory holds
    the header and the tensor asked for, never the file (Hugging Face LLM shards)."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._file = open(path, "rb")
            head = self._file.read(8)
            (header_len,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
            size = self._file.seek(0, 2)
            if header_len is None or header_len > size - 8:
                raise SafetensorsError(path, "not a safetensors file (bad header length)")
            self._file.seek(8)
            header, _ = _read_header(path, head + self._file.read(header_len))
        except OSError as e:
            raise SafetensorsError(path, f"cannot read: {e.strerror or e}") from e
        self._body_start, self._body_len = 8 + header_len, size - 8 - header_len
        self.metadata = header.pop("__metadata__", {}) or {}
        self.header = header

    @property
    def names(self) -> list[str]:
        return sorted(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def read(self, name: str) -> np.ndarray:
        info = self.header[name]
        begin, end = info.get("data_offsets", [0, 0]) if isinstance(info, dict) else (0, 0)
        if not (isinstance(begin, int) and isinstance(end, int)
                and 0 <= begin <= end <= self._body_len):
            raise SafetensorsError(self.path, f"tensor {name}: data_offsets {begin, end} "
                                              f"outside the {self._body_len} data bytes")
        self._file.seek(self._body_start + begin)
        raw = self._file.read(end - begin)
        # _tensor checks dtype, shape and size against the header entry.
        return _tensor(self.path, name, dict(info, data_offsets=[0, len(raw)]),
                       memoryview(raw))

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def save_streamed(path: str, specs, arrays, metadata: Mapping[str, str] | None = None) -> None:
    """Writes a safetensors file from `specs` [(name, shape, dtype)] (the header, in
    file order) and `arrays`, an iterable yielding each tensor in that order: one
    tensor in memory at a time. Written to path + ".tmp", then renamed."""
    header, offset = {}, 0
    for name, shape, dtype in specs:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = dict(metadata)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        count = 0
        for (name, shape, dtype), array in zip(specs, arrays):
            array = np.ascontiguousarray(array, dtype=dtype)
            if tuple(array.shape) != tuple(shape):
                raise ValueError(f"{name}: got shape {array.shape}, header says {shape}")
            f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
            count += 1
        if count != len(specs):
            raise ValueError(f"{path}: {count} tensors for {len(specs)} header entries")
    import os
    os.replace(path + ".tmp", path)
