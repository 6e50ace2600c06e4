"""Sharded record files read block by block: the web-scale sources.

A source here is a list of shard files (a glob, local or remote) in one format:

  lines      .txt (one record per non-empty line), .jsonl, .jsonl.gz / .txt.gz
  parquet    .parquet, read by row group (Hugging Face datasets' layout)
  webdataset .tar as img2dataset writes it: members grouped by key
             (`dir/000123.jpg`, `dir/000123.txt`, `dir/000123.json` = one sample)
  array_record  .array_record, random access (pre-tokenized text: web_sources.py)

Random access without holding the corpus. Start-up indexes every shard once, reading
only what locates records: tar headers (the data is seeked over), parquet footers,
and for line files the lines themselves (one streaming pass). The index keeps the
record count and the position of every INDEX_STRIDE-th record (8 bytes per 16
records), so memory grows by half a byte per record, not with the bytes read.

`ShardedRecords` is a grain MapDataset over all records of all shards in order.
Reads go by block: record i is served from the block of `block` records holding it,
read with one seek and one sequential read and kept in a small cache, so walking a
block in any order costs one read. `BlockShuffledStream` is the training order built
on that: per epoch, the blocks in a seeded random order and the records of each block
in a seeded random order (webdataset's shard shuffle + buffer shuffle, but a pure
function of the index, so resume is exact), and `.shard(k, n)` hands shard k of n
(process x grain worker) every n-th block, so each reader reads 1/n of the bytes.

Nothing is lost silently: a shard that cannot be opened or indexed is counted and
named (`unreadable_shards`), the readable prefix of a shard whose index pass fails
midway is kept (`truncated_shards`), a block whose read fails becomes one error
record per record in it ("unreadable_block"), and each record's `origin` names its
shard and line / row / sample key.

Paths open through data_pipelines/paths.py (local, etils.epath, fsspec).
"""
from __future__ import annotations

import collections
import dataclasses
import gzip
import io
import logging
import os
import sys
import tarfile
from typing import Any, Callable, Optional

import grain
import numpy as np

from data_pipelines.paths import is_remote, open_binary, shard_name

INDEX_STRIDE = 16  # records between stored positions
_CACHED_BLOCKS = 4  # per reader: the block being walked and its neighbours


# --- formats ----------------------------------------------------------------------

@dataclasses.dataclass
class ShardIndex:
    count: int  # records in the shard
    positions: np.ndarray  # int64: where record i * INDEX_STRIDE starts (format's unit)
    problem: str = ""  # why indexing stopped early ("" = whole shard indexed)
    unreadable: bool = False  # the shard could not be opened at all (problem says why)


# Indices of local shards, by (path, size, mtime, format, columns): a shard read by two
# streams of a run (images and their captions, the train and eval splits) or by a
# restarted iterator is indexed once per process. Remote shards are indexed each time.
_INDEX_CACHE: "collections.OrderedDict" = collections.OrderedDict()
_INDEX_CACHE_SHARDS = 100_000


def _indexed(fmt, path: str, parquet_columns: tuple) -> ShardIndex:
    key = None
    if not is_remote(path):
        try:
            st = os.stat(path)
            key = (path, st.st_size, st.st_mtime_ns, fmt.name, tuple(parquet_columns))
        except OSError:
            pass
    if key in _INDEX_CACHE:
        return _INDEX_CACHE[key]
    try:
        index = fmt.index(path)
    except Exception as e:  # noqa: BLE001 - any failure to open is counted
        return ShardIndex(0, np.zeros(0, np.int64), f"{type(e).__name__}: {e}", unreadable=True)
    if key is not None:
        _INDEX_CACHE[key] = index
        while len(_INDEX_CACHE) > _INDEX_CACHE_SHARDS:
            _INDEX_CACHE.popitem(last=False)
    return index


class LineFormat:
    """One record per non-empty line; items are (line number, bytes). Gzip files
    (.gz) are read through gzip: positions are offsets in the decompressed stream,
    so reaching a block decompresses the shard up to it (prefer uncompressed or
    parquet shards for very large files)."""

    name = "lines"

    @staticmethod
    def _open(path: str):
        raw = open_binary(path)
        return gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw

    def index(self, path: str) -> ShardIndex:
        positions, count, problem = [], 0, ""
        with self._open(path) as f:
            offset = 0
            try:
                for line in f:
                    if line.strip():
                        if count % INDEX_STRIDE == 0:
                            positions.append(offset)
                        count += 1
                    offset += len(line)
            except (OSError, EOFError, gzip.BadGzipFile) as e:
                problem = f"{type(e).__name__}: {e} after {count} lines"
        return ShardIndex(count, np.asarray(positions, np.int64), problem)

    def read(self, path: str, index: ShardIndex, lo: int, hi: int) -> list:
        with self._open(path) as f:
            f.seek(int(index.positions[lo // INDEX_STRIDE]))
            record = lo - lo % INDEX_STRIDE
            items = []
            for line in f:
                if not line.strip():
                    continue
                if record >= lo:
                    items.append(line)
                record += 1
                if record >= hi:
                    break
        if len(items) != hi - lo:
            raise OSError(f"read {len(items)} of records {lo}..{hi - 1}: the shard changed "
                          "since it was indexed")
        return items


class ParquetFormat:
    """Rows; items are {column: value} for those of `columns` the file has (at least
    one must be there). Positions are row group starts."""

    name = "parquet"

    def __init__(self, columns: tuple[str, ...]):
        self.columns = columns

    def index(self, path: str) -> ShardIndex:
        import pyarrow.parquet as pq

        with open_binary(path) as f:
            file = pq.ParquetFile(f)
            meta = file.metadata
            rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            names = set(file.schema_arrow.names)
        if not any(c in names for c in self.columns):
            raise ValueError(f"has none of the columns {list(self.columns)}, only "
                             f"{sorted(names)}")
        starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        return ShardIndex(int(starts[-1]), starts)

    def read(self, path: str, index: ShardIndex, lo: int, hi: int) -> list:
        import pyarrow.parquet as pq

        starts = index.positions
        first = int(np.searchsorted(starts, lo, side="right")) - 1
        last = int(np.searchsorted(starts, hi - 1, side="right")) - 1
        items = []
        with open_binary(path) as f:
            file = pq.ParquetFile(f)
            present = [c for c in self.columns if c in file.schema_arrow.names]
            for g in range(first, last + 1):
                table = file.read_row_group(g, columns=present)
                a, b = max(lo, starts[g]) - starts[g], min(hi, starts[g + 1]) - starts[g]
                items += table.slice(a, b - a).to_pylist()
        return items


def _drop_last(positions: list, count: int) -> int:
    """Forgets the last of `count` indexed samples (its stored position too)."""
    count -= 1
    if count % INDEX_STRIDE == 0:
        positions.pop()
    return count


def sample_key(member_name: str) -> tuple[str, str]:
    """webdataset's grouping: 'dir/000123.seg.jpg' -> ('dir/000123', 'seg.jpg')."""
    directory, _, base = member_name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


class TarFormat:
    """webdataset tar shards; items are (key, {extension: bytes}) per sample, a sample
    being consecutive members that share a key. Positions are header offsets."""

    name = "webdataset"

    def index(self, path: str) -> ShardIndex:
        positions, count, problem, key = [], 0, "", None
        with open_binary(path) as f:
            size = f.seek(0, io.SEEK_END)
            f.seek(0)
            try:
                with tarfile.open(fileobj=f, mode="r:") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        k, _ = sample_key(member.name)
                        if member.offset_data + member.size > size:
                            # Cut off (an interrupted copy): keep the samples before it.
                            if k == key:
                                count = _drop_last(positions, count)
                            problem = (f"{member.name} ends past the end of the file "
                                       f"({size} bytes) after {count} samples")
                            break
                        if k != key:
                            if count % INDEX_STRIDE == 0:
                                positions.append(member.offset)
                            count, key = count + 1, k
            except (tarfile.TarError, OSError, EOFError) as e:
                # The sample being read may be missing members: keep those before it.
                if count:
                    count = _drop_last(positions, count)
                problem = f"{type(e).__name__}: {e} after {count} whole samples"
        return ShardIndex(count, np.asarray(positions, np.int64), problem)

    def read(self, path: str, index: ShardIndex, lo: int, hi: int) -> list:
        items: list = []
        record = lo - lo % INDEX_STRIDE - 1
        with open_binary(path) as f:
            f.seek(int(index.positions[lo // INDEX_STRIDE]))
            try:
                with tarfile.open(fileobj=f, mode="r:") as tar:
                    key = None
                    for member in tar:
                        if not member.isfile():
                            continue
                        k, extension = sample_key(member.name)
                        if k != key:
                            record, key = record + 1, k
                            if record >= hi:
                                break
                            if record >= lo:
                                items.append((k, {}))
                        if record >= lo:
                            items[-1][1][extension] = tar.extractfile(member).read()
            except (tarfile.TarError, EOFError):
                # Past the last indexed sample of a cut-off shard: the index kept only
                # whole samples, so a failure after all of them is the shard's end.
                if len(items) != hi - lo or record < hi - 1:
                    raise
        if len(items) != hi - lo:
            raise OSError(f"read {len(items)} of samples {lo}..{hi - 1}: the shard changed "
                          "since it was indexed")
        return items


class ArrayRecordFormat:
    """ArrayRecord files (random access natively; local paths only, as array_record
    reads them); items are the records' bytes."""

    name = "array_record"

    @staticmethod
    def _reader(path: str):
        if is_remote(path):
            raise OSError("array_record reads local files only")
        from array_record.python import array_record_module

        return array_record_module.ArrayRecordReader(path)

    def index(self, path: str) -> ShardIndex:
        reader = self._reader(path)
        try:
            return ShardIndex(int(reader.num_records()), np.zeros(0, np.int64))
        finally:
            reader.close()

    def read(self, path: str, index: ShardIndex, lo: int, hi: int) -> list:
        reader = self._reader(path)
        try:
            return list(reader.read(lo, hi))
        finally:
            reader.close()


def format_for(path: str, parquet_columns: tuple[str, ...] = ()):
    """The format of a shard by its name."""
    name = path.lower()
    if name.endswith(".tar"):
        return TarFormat()
    if name.endswith(".parquet"):
        return ParquetFormat(parquet_columns)
    if name.endswith(".array_record"):
        return ArrayRecordFormat()
    if name.endswith((".txt", ".jsonl", ".json", ".txt.gz", ".jsonl.gz")):
        return LineFormat()
    raise ValueError(f"{shard_name(path)}: unknown shard format (expected .tar, .parquet, "
                     ".array_record, .txt, .jsonl or their .gz)")


# --- the records of all shards ----------------------------------------------------

class ShardedRecords(grain.MapDataset):
    """All records of `paths` in order; `to_record(item, path, origin)` makes each
    item a record (ImageCaptionRecord, TextRecord, ...; errors become error records).

    `error_record(reason, detail, origin)` builds the record standing for one record of
    a block that could not be read. Shards that cannot be opened contribute no records
    and are listed in `unreadable_shards` (name, why); shards indexed only partway in
    `truncated_shards`.
    """

    def __init__(self, paths: list[str], to_record: Callable[[Any, str, str], Any],
                 error_record: Callable[[str, str, str], Any], block: int = 256,
                 parquet_columns: tuple[str, ...] = ()):
        super().__init__()
        self.paths, self.block = list(paths), max(1, int(block))
        self._to_record, self._error_record = to_record, error_record
        self._formats, self._indices = [], []
        self.unreadable_shards: list[tuple[str, str]] = []
        self.truncated_shards: list[tuple[str, str]] = []
        for path in self.paths:
            fmt = format_for(path, parquet_columns)
            index = _indexed(fmt, path, parquet_columns)
            if index.unreadable or (index.problem and not index.count):
                self.unreadable_shards.append((shard_name(path), index.problem))
            elif index.problem:
                self.truncated_shards.append((shard_name(path), index.problem))
            self._formats.append(fmt)
            self._indices.append(index)
        for kind, shards in (("cannot be read", self.unreadable_shards),
                             ("is read only up to an error", self.truncated_shards)):
            for name, why in shards:
                logging.warning("data shard %s %s: %s", name, kind, why)
        counts = [index.count for index in self._indices]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._cache: collections.OrderedDict = collections.OrderedDict()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def index_bytes(self) -> int:
        """Host memory the index holds (what grows with the corpus)."""
        return self._starts.nbytes + sum(i.positions.nbytes for i in self._indices)

    def __getstate__(self):  # grain workers get the index, not this process's cache
        state = dict(self.__dict__)
        state["_cache"] = collections.OrderedDict()
        return state

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        lo = index - index % self.block
        return self.read_range(lo, min(lo + self.block, len(self)))[index - lo]

    def read_range(self, lo: int, hi: int) -> list:
        """Records [lo, hi), read shard by shard with one seek each; cached."""
        key = (lo, hi)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        records = []
        shard = int(np.searchsorted(self._starts, lo, side="right")) - 1
        while lo < hi:
            start, end = self._starts[shard], self._starts[shard + 1]
            a, b = lo - start, min(hi, end) - start
            records += self._read_shard(shard, int(a), int(b))
            lo, shard = int(start + b), shard + 1
        self._cache[key] = records
        while len(self._cache) > _CACHED_BLOCKS:
            self._cache.popitem(last=False)
        return records

    def _read_shard(self, shard: int, a: int, b: int) -> list:
        path, fmt = self.paths[shard], self._formats[shard]
        name = shard_name(path)
        try:
            items = fmt.read(path, self._indices[shard], a, b)
        except Exception as e:  # noqa: BLE001 - counted per record, never fatal
            detail = f"{type(e).__name__}: {e}"
            return [self._error_record("unreadable_block", detail, f"{name} record {a + i}")
                    for i in range(b - a)]
        return [self._to_record(item, path, f"{name} {_where(fmt, item, a + i)}")
                for i, item in enumerate(items)]


def _where(fmt, item, record: int) -> str:
    if isinstance(fmt, TarFormat):
        return f"sample {item[0]}"
    if isinstance(fmt, ParquetFormat):
        return f"row {record}"
    return f"record {record}"


class ShardedView(grain.MapDataset):
    """Records [offset, offset + length) of a ShardedRecords (a split), each passed
    through `post` (e.g. an image record's caption as a text record)."""

    def __init__(self, base: ShardedRecords, offset: int = 0, length: Optional[int] = None,
                 post: Optional[Callable[[Any], Any]] = None):
        super().__init__()
        self.base, self.offset = base, offset
        self.length = len(base) - offset if length is None else length
        self.post = post

    def __len__(self) -> int:
        return self.length

    @property
    def block(self) -> int:
        return self.base.block

    def split(self, start: int, stop: Optional[int] = None) -> "ShardedView":
        stop = self.length if stop is None else min(stop, self.length)
        return ShardedView(self.base, self.offset + start, stop - start, self.post)

    def map_records(self, fn: Callable[[Any], Any]) -> "ShardedView":
        post = self.post
        return ShardedView(self.base, self.offset, self.length,
                           fn if post is None else (lambda r: fn(post(r))))

    def read_in_block(self, lo: int, hi: int, index: int):
        """Record `index`, read as part of the block [lo, hi) (one cached read)."""
        record = self.base.read_range(self.offset + lo, self.offset + hi)[index - lo]
        return record if self.post is None else self.post(record)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        index = int(index)
        if not 0 <= index < self.length:
            raise IndexError(f"record {index} of {self.length}")
        record = self.base[self.offset + index]
        return record if self.post is None else self.post(record)


# --- training order ---------------------------------------------------------------

class BlockShuffledStream(grain.MapDataset):
    """An infinite stream over a ShardedView, read block by block.

    Epoch e cuts the records into ceil(length / block) blocks (the last one wraps to
    the start, so up to block - 1 records of the first block are read twice per
    epoch), visits the blocks in a seeded order and each block's records in a seeded
    order (shuffle=False: natural order). `shard(k, n)` is the view holding blocks
    k, k + n, ... of that order, so n readers read disjoint blocks (with blocks of at
    most length // n records, so each reader has at least one).
    """

    def __init__(self, records: ShardedView, seed: int, shuffle: bool,
                 shard_index: int = 0, shard_count: int = 1):
        super().__init__()
        if len(records) <= 0:
            raise ValueError("a sharded source with no records")
        self.records, self.length = records, len(records)
        self.seed, self.shuffle = seed % 2**32, shuffle
        # Smaller blocks when there are fewer than one per reader (a small eval split
        # over many processes), so readers still get distinct records.
        self.block = min(records.block, max(1, self.length // shard_count))
        self.blocks_per_epoch = -(-self.length // self.block)
        self.shard_index, self.shard_count = shard_index, shard_count

    def shard(self, k: int, n: int) -> "BlockShuffledStream":
        """Blocks k, k + n, ... of this stream's order (composes: a shard of a shard)."""
        return BlockShuffledStream(self.records, self.seed, self.shuffle,
                                   self.shard_index + self.shard_count * k,
                                   self.shard_count * n)

    def __len__(self) -> int:
        return sys.maxsize

    def record_at(self, position: int) -> int:
        """Record (within [0, length)) at `position` of the unsharded order."""
        epoch, j = divmod(position, self.blocks_per_epoch * self.block)
        block, within = divmod(j, self.block)
        if self.shuffle:
            seed = (self.seed * 1_000_003 + epoch) % 2**32
            if self.blocks_per_epoch > 1:
                block = grain.experimental.index_shuffle(
                    block, max_index=self.blocks_per_epoch - 1, seed=seed, rounds=4)
            if self.block > 1:
                within = grain.experimental.index_shuffle(
                    within, max_index=self.block - 1,
                    seed=(seed + 7919 * (block + 1)) % 2**32, rounds=4)
        return (block * self.block + within) % self.length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        q, within = divmod(int(index), self.block)
        record = self.record_at((q * self.shard_count + self.shard_index) * self.block + within)
        lo = record - record % self.block
        return self.records.read_in_block(lo, min(lo + self.block, self.length), record)
