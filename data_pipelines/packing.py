"""First-fit packing of documents (with images) into contract batches, with exact state.

grain's packers split every feature at row boundaries, which would cut images, so
this packer is our own IterDataset over a MapDataset of DocItems:

  * A pool of `open_rows` rows stays open. A document goes into the first open row
    with room for its length and its images; if none has room, a new row opens,
    and when the pool is full the fullest open row is closed first.
  * Image documents are never split. One longer than a row (or with more images
    than a row has slots) is skipped and counted.
  * Text-only documents that fit nowhere are split: the head fills the open row
    with the most room (if that room is >= min_text_chunk), the rest goes on.
    Each chunk is its own segment (positions restart), as in concat-and-split.
  * Closed rows are batched in closing order and laid out by tfusion.batch.assemble_rows.

State is small and JSON-able: the next document index and each open/closed row as
(document index, start, end) pieces. set_state re-reads those documents from the
MapDataset (deterministic by index), so a restored iterator continues exactly.

Each batch carries `STATS_KEY`: counters accumulated since the previous batch
(documents, skipped/<reason>, repaired/<reason>, tokens); the pipeline pops it.
A batch also carries `EXAMPLES_KEY` ({reason: detail of its first record}) when
skip reasons were seen for the first time since the previous batch; examples are
strings, so they are not summed with the counters.

Image capacity (data.image_capacity_per_row; `capacity`): the model runs its modality
layers on at most `per_unit` images per unit of rows (one device's rows of one
microbatch: `unit_of_row`). A batch then takes closed rows in closing order into the
unit with the most room left that has a free row and room for the row's images; a row
that fits no unit waits for the next batch (counted: deferred/image_capacity). Rows
waiting beyond CAPACITY_BACKLOG batches mean the capacity is below what the data needs:
UnusableDataError naming the field.

Giving up: every record read (packed or skipped) goes to a stats.RecordOutcomes;
when `limits` are set and the records break them (e.g. every record is skipped,
which would otherwise spin forever over a repeating source), `next` raises
UnusableDataError naming the counts and the top reasons with an example each. Each
packer (one per mp_prefetch worker) judges the records it reads itself; the
outcomes are part of the state, so a restored packer stops at the same record.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Optional

import grain
import numpy as np

from data_pipelines.records import DocItem, UnusableDataError, located
from data_pipelines.stats import RecordOutcomes, UsabilityLimits
from tfusion.batch import BatchSpec, assemble_rows, document_images, document_length

STATS_KEY = "__pipeline_stats__"
EXAMPLES_KEY = "__skip_examples__"
CAPACITY_BACKLOG = 16  # batches' worth of rows that may wait for image capacity


@dataclasses.dataclass(frozen=True)
class ImageCapacity:
    """Unit of each row position of a batch, and the images a unit may hold."""

    unit_of_row: tuple[int, ...]
    per_unit: int
    per_row: float  # data.image_capacity_per_row, for messages


class PackingIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.MapDataset, spec: BatchSpec, pad_id: int,
                 open_rows: int = 0, min_text_chunk: int = 16,
                 limits: Optional[UsabilityLimits] = None,
                 capacity: Optional[ImageCapacity] = None):
        super().__init__(parent)
        self.spec, self.pad_id = spec, pad_id
        self.capacity = capacity
        self.open_rows = open_rows or 2 * spec.batch_size
        self.min_text_chunk = min_text_chunk
        self.limits = limits  # None: never give up

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """mp_prefetch workers each pack a disjoint slice of the documents."""
        del sequential_slice  # our parent is always random-access
        self._parents = (self._parent.slice(sl),)

    def __iter__(self) -> "PackingIterator":
        return PackingIterator(self._parent, self)


def _joined_text(doc):
    """Text-only documents as one token array, so chunks are plain slices."""
    if document_images(doc):
        return doc
    return [np.concatenate([np.asarray(s, np.int32) for s in doc])]


class _Row:
    def __init__(self, pieces=None, used=0, images=0):
        self.pieces: list[list[int]] = pieces or []  # [doc index, start, end]
        self.used, self.images = used, images

    def to_state(self) -> list:
        return [self.used, self.images, [list(p) for p in self.pieces]]

    @classmethod
    def from_state(cls, state) -> "_Row":
        used, images, pieces = state
        return cls([list(p) for p in pieces], int(used), int(images))


class PackingIterator(grain.DatasetIterator):
    def __init__(self, docs: grain.MapDataset, options: PackingIterDataset):
        super().__init__()
        self._docs = docs
        self._spec, self._pad_id = options.spec, options.pad_id
        self._max_open, self._min_chunk = options.open_rows, options.min_text_chunk
        self._capacity = options.capacity
        self._p = options.spec.patches_per_image
        self._next_index = 0
        self._open: list[_Row] = []
        self._closed: list[_Row] = []
        self._counts: collections.Counter = collections.Counter()
        self._outcomes = RecordOutcomes(options.limits)
        self._cache: dict[int, Any] = {}  # doc index -> Document of pieces in rows

    # --- reading documents -------------------------------------------------------

    def _read(self, index: int) -> DocItem:
        try:
            item = self._docs[index]
        except Exception as e:  # a bug upstream must not kill training: count it
            return DocItem.skipped(f"unexpected_{type(e).__name__}",
                                   detail=located(f"document {index}", str(e)))
        if not isinstance(item, DocItem):
            return DocItem.skipped("not_a_document",
                                   detail=f"document {index} is a {type(item).__name__}")
        return item

    def _unfit(self, n: int, k: int) -> tuple[str, str]:
        """(skip reason, detail) for a document no row can hold, else ("", "")."""
        spec = self._spec
        if k > spec.max_images:
            return "too_many_images", f"{k} images; a row has {spec.max_images} slots"
        if k and n > spec.seq_len:
            return "too_long_with_image", (f"{n} positions with {k} image(s); rows hold "
                                           f"{spec.seq_len} and images are never split")
        if n == 0:
            return "empty_document", ""
        return "", ""

    def _skip(self, reason: str, detail: str, source: str = "") -> None:
        self._counts[f"skipped/{reason}"] += 1
        if source:
            self._counts[f"source/{source}/skipped/{reason}"] += 1
        self._outcomes.add_skipped(reason, detail)

    def _add(self, index: int, item: DocItem) -> None:
        for repair in item.repairs:
            self._counts[f"repaired/{repair}"] += 1
        doc = item.document
        if doc is None:
            self._skip(item.skip_reason, item.detail, item.source)
            return
        n, k = document_length(doc, self._p), document_images(doc)
        reason, detail = self._unfit(n, k)
        if reason:
            self._skip(reason, located(f"document {index}", detail), item.source)
            return
        self._counts["documents"] += 1
        if item.source:
            self._counts[f"source/{item.source}/documents"] += 1
        self._outcomes.add_usable()
        self._cache[index] = _joined_text(doc)
        if k:
            self._place(self._fitting_row(n, k) or self._new_row(), [index, 0, n], n, k)
        else:
            self._place_text(index, n)

    # --- placement -----------------------------------------------------------------

    def _fitting_row(self, n: int, k: int):
        for row in self._open:
            if self._spec.seq_len - row.used >= n and row.images + k <= self._spec.max_images:
                return row
        return None

    def _new_row(self) -> _Row:
        if len(self._open) >= self._max_open:
            fullest = max(self._open, key=lambda r: r.used)  # first of equals
            self._close(fullest)
        row = _Row()
        self._open.append(row)
        return row

    def _close(self, row: _Row) -> None:
        self._open.remove(row)
        self._closed.append(row)

    def _place(self, row: _Row, piece: list[int], n: int, k: int) -> None:
        row.pieces.append(piece)
        row.used += n
        row.images += k
        if row.used == self._spec.seq_len:
            self._close(row)

    def _place_text(self, index: int, n: int) -> None:
        start, split = 0, False
        while start < n:
            rest = n - start
            row = self._fitting_row(rest, 0)
            if row is None:
                roomiest = max(self._open, key=lambda r: self._spec.seq_len - r.used,
                               default=None)
                room = self._spec.seq_len - roomiest.used if roomiest else 0
                if room >= self._min_chunk:
                    row, rest = roomiest, room
                else:
                    row, rest = self._new_row(), min(rest, self._spec.seq_len)
            self._place(row, [index, start, start + rest], rest, 0)
            split = split or start + rest < n
            start += rest
        self._counts["split_text_documents"] += split

    # --- batches ---------------------------------------------------------------------

    def _row_documents(self, row: _Row) -> list:
        docs = []
        for index, start, end in row.pieces:
            doc = self._cache[index]
            docs.append(doc if document_images(doc) else [doc[0][start:end]])
        return docs

    def _batch_rows(self, final: bool) -> Optional[list]:
        """The next batch's rows by position, taken out of the closed rows; None if
        the closed rows cannot fill it yet (final: fill what fits, pad the rest)."""
        b = self._spec.batch_size
        if self._capacity is None:
            if len(self._closed) < b and not final:
                return None
            rows, self._closed = self._closed[:b], self._closed[b:]
            return rows + [_Row() for _ in range(b - len(rows))]
        units = self._capacity.unit_of_row
        free = collections.defaultdict(list)  # unit -> free positions
        for position, unit in enumerate(units):
            free[unit].append(position)
        room = {unit: self._capacity.per_unit for unit in free}
        placed: list = [None] * b
        taken, last = set(), -1
        for i, row in enumerate(self._closed):
            fits = [u for u in free if free[u] and room[u] >= row.images]
            if fits:
                unit = max(fits, key=lambda u: (room[u], -u))  # most room, then lowest
                placed[free[unit].pop(0)] = row
                room[unit] -= row.images
                taken.add(i)
                last = i
                if len(taken) == b:
                    break
        if len(taken) < b and not final:
            if len(self._closed) > CAPACITY_BACKLOG * b:
                raise UnusableDataError(self._capacity_report())
            return None
        self._counts["deferred/image_capacity"] += sum(1 for i in range(last) if i not in taken)
        self._closed = [row for i, row in enumerate(self._closed) if i not in taken]
        return [row if row is not None else _Row() for row in placed]

    def _capacity_report(self) -> str:
        cap = self._capacity
        waiting = sum(r.images for r in self._closed)
        return (f"data.image_capacity_per_row={cap.per_row} cannot carry this data: "
                f"{len(self._closed)} packed rows holding {waiting} images wait for room "
                f"(each unit of {cap.unit_of_row.count(0)} rows takes {cap.per_unit} images). "
                "Raise data.image_capacity_per_row (0 = every slot), or mix in more text.")

    def __next__(self) -> dict:
        b = self._spec.batch_size
        tried = -1  # closed rows at the last failed fill: only new rows can change it
        while (len(self._closed) == tried
               or (rows := self._batch_rows(final=False)) is None):
            tried = len(self._closed)
            if self._next_index >= len(self._docs):  # finite input: flush what is left
                if not self._open and not self._closed and not self._counts:
                    raise StopIteration
                # Trailing skipped records still reach the statistics, in an
                # all-padding batch if no row is left (finite inputs only).
                while self._open:
                    self._close(self._open[0])
                rows = self._batch_rows(final=True)
                break
            index = self._next_index
            self._next_index += 1
            self._add(index, self._read(index))
            self._outcomes.check()
        batch = assemble_rows([self._row_documents(r) for r in rows], self._spec, self._pad_id)
        self._counts["batches"] += 1
        self._counts["rows"] += b
        self._counts["row_tokens"] += b * self._spec.seq_len
        self._counts["nonpad_tokens"] += sum(r.used for r in rows)
        self._counts["images"] += sum(r.images for r in rows)
        batch[STATS_KEY] = dict(self._counts)
        self._counts = collections.Counter()
        examples = self._outcomes.take_new_examples()
        if examples:
            batch[EXAMPLES_KEY] = examples
        self._drop_unreferenced()
        return batch

    def _referenced(self) -> set[int]:
        return {p[0] for row in self._open + self._closed for p in row.pieces}

    def _drop_unreferenced(self) -> None:
        keep = self._referenced()
        self._cache = {i: d for i, d in self._cache.items() if i in keep}

    # --- state -----------------------------------------------------------------------

    def get_state(self) -> dict:
        return {
            "next_index": self._next_index,
            "open_rows": [r.to_state() for r in self._open],
            "closed_rows": [r.to_state() for r in self._closed],
            "counts": dict(self._counts),
            "outcomes": self._outcomes.get_state(),
        }

    def set_state(self, state: dict) -> None:
        self._next_index = int(state["next_index"])
        self._open = [_Row.from_state(s) for s in state["open_rows"]]
        self._closed = [_Row.from_state(s) for s in state["closed_rows"]]
        self._counts = collections.Counter({k: int(v) for k, v in state["counts"].items()})
        self._outcomes = RecordOutcomes(self._outcomes.limits)
        if "outcomes" in state:  # absent in states saved before outcomes were tracked
            self._outcomes.set_state(state["outcomes"])
        # Documents are a pure function of their index: re-read the ones in rows.
        self._cache = {}
        for i in sorted(self._referenced()):
            self._cache[i] = _joined_text(self._read(i).document)
