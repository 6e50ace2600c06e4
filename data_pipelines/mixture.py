"""Mixtures of document streams by token share.

A run reads one or more named sources (`mixture_entries`): `data.mixture`, a list of
{"name", "source", "data_dir", "weight"} entries (a JSON string on the command line,
a list of dicts in a config file; other keys override that entry's `data.` fields,
e.g. "caption_column"), or, when it is empty, the single image source and text source
of `data.source` / `data.text_source` as two entries "image" (weight
1 - text_token_share) and "text" (weight text_token_share). Source "text" is a text
corpus at data_dir; "captions" the captions of `data.source` as plain text.

Weights are shares of packed tokens (paper: 1:1 text : image, i.e. 0.5 each; an
image document's positions - caption, markers and patches - all count for its
stream). grain's mix picks documents, not tokens, so each stream's sampling weight is
its share divided by its mean document length, measured on the stream's first
`probe_docs` documents (a deterministic probe; skipped documents are ignored).

`MixedDocuments` is the mixture of shard k of n of every stream: each stream is
sharded first (block-read streams by blocks, so a reader reads 1/n of each corpus),
then mixed with the weights measured once, on the unsharded streams.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Callable, Optional

import grain

from tfusion.batch import document_length

ENTRY_KEYS = ("name", "source", "data_dir", "weight")
TEXT_ENTRY_SOURCES = ("text", "captions")
NAME = re.compile(r"^[a-z][a-z0-9_]*$")
RESERVED_NAMES = ("skipped", "repaired")  # data_<name>_... would read as global counts


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    source: str  # an image source, "text" or "captions"
    data_dir: str
    weight: float  # token share before normalisation
    overrides: tuple[tuple[str, object], ...] = ()  # other data fields for this entry

    @property
    def is_text(self) -> bool:
        return self.source in TEXT_ENTRY_SOURCES


def _fail(field: str, message: str):
    from tfusion.config import ConfigError

    raise ConfigError(f"data.{field}", message)


def _raw_mixture(value) -> list:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            _fail("mixture", f"not a JSON list of entries ({e})")
    if not isinstance(value, (list, tuple)):
        _fail("mixture", f"a list of {{name, source, data_dir, weight}} entries, got "
                         f"{type(value).__name__}")
    return [dict(entry) if hasattr(entry, "items") else entry for entry in value]


def mixture_entries(d) -> list[Entry]:
    """The run's named sources with positive weight (validated: bad entries raise
    ConfigError naming data.mixture[i].<key>)."""
    if not d.mixture:
        entries = []
        if d.source != "none" and d.text_token_share < 1.0:
            entries.append(Entry("image", d.source, d.data_dir, 1.0 - d.text_token_share))
        if d.text_source != "none" and d.text_token_share > 0.0:
            text = "text" if d.text_source == "files" else "captions"
            entries.append(Entry("text", text, d.text_files, d.text_token_share))
        if not entries:
            _fail("text_token_share", "no document stream: the image and text sources are "
                                      "off or weighted 0")
        return entries
    entries, names = [], set()
    for i, raw in enumerate(_raw_mixture(d.mixture)):
        where = f"mixture[{i}]"
        if not isinstance(raw, dict):
            _fail(where, f"an entry is a dict, got {type(raw).__name__}")
        for key in ("name", "source", "weight"):
            if key not in raw:
                _fail(where, f"needs {key!r} (entries have {ENTRY_KEYS})")
        name, weight = raw["name"], raw["weight"]
        if (not isinstance(name, str) or not NAME.match(name) or name in names
                or name in RESERVED_NAMES):
            _fail(f"{where}.name", f"{name!r}: a new lower-case identifier per entry")
        if not isinstance(weight, (int, float)) or weight < 0:
            _fail(f"{where}.weight", f"a token share >= 0, got {weight!r}")
        overrides = tuple(sorted((k, v) for k, v in raw.items() if k not in ENTRY_KEYS))
        for key, _ in overrides:
            if key not in d or key in ("mixture", "source", "text_source"):
                _fail(f"{where}.{key}", "not a data field an entry can set")
        names.add(name)
        if weight > 0:
            entries.append(Entry(name, raw["source"], raw.get("data_dir", ""), float(weight),
                                 overrides))
    if not entries:
        _fail("mixture", "every entry has weight 0")
    return entries


def entry_data(d, entry: Entry):
    """The data config one entry reads: `d` with its source, data_dir and overrides."""
    out = d.copy_and_resolve_references()
    with out.unlocked():
        if not entry.is_text:
            out.source, out.data_dir = entry.source, entry.data_dir
        elif entry.source == "text":
            out.text_files = entry.data_dir
        for key, value in entry.overrides:
            out[key] = value
    return out


def mean_document_length(stream: grain.MapDataset, probe_docs: int, patches: int) -> float:
    lengths = []
    for i in range(probe_docs):
        doc = stream[i].document
        if doc is not None:
            lengths.append(document_length(doc, patches))
    # A stream whose probe is all bad records still mixes (its records get counted
    # as skipped downstream); length 1 is a neutral placeholder.
    return sum(lengths) / len(lengths) if lengths else 1.0


@dataclasses.dataclass(frozen=True)
class Stream:
    """One entry's infinite document stream: `documents(k, n)` is its shard k of n."""

    name: str
    token_share: float
    documents: Callable[[int, int], grain.MapDataset]


def document_probabilities(streams: list[Stream], probe_docs: int, patches: int
                           ) -> dict[str, float]:
    """{name: probability a mixed document comes from it}, for the token shares."""
    if len(streams) == 1:
        return {streams[0].name: 1.0}
    weights = {s.name: s.token_share / mean_document_length(s.documents(0, 1), probe_docs,
                                                             patches)
               for s in streams}
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


class MixedDocuments(grain.MapDataset):
    """Shard k of n of the mixture; `slice(w::W)` (grain's worker slicing, taken by
    the packer) is shard k + n * w of n * W, i.e. the same split of documents a slice
    of the shard's stream would give, but read stream by stream."""

    def __init__(self, streams: list[Stream], probabilities: dict[str, float],
                 shard_index: int = 0, shard_count: int = 1):
        super().__init__()
        self.streams, self.probabilities = streams, probabilities
        self.shard_index, self.shard_count = shard_index, shard_count
        parts = [s.documents(shard_index, shard_count) for s in streams]
        self._mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(
            parts, [probabilities[s.name] for s in streams])

    def __len__(self) -> int:
        return len(self._mixed)

    def slice(self, sl: slice) -> "MixedDocuments":
        start, step = sl.start or 0, sl.step or 1
        if sl.stop is not None or start < 0 or step < 1:
            raise ValueError(f"documents are sharded by [k::n] slices, got {sl}")
        return MixedDocuments(self.streams, self.probabilities,
                              self.shard_index + self.shard_count * start,
                              self.shard_count * step)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._mixed[index]


def shard_of(stream: grain.MapDataset, k: int, n: int) -> grain.MapDataset:
    """Shard k of n of an infinite record stream: every n-th block of a block-read
    stream, every n-th record of a random-access one."""
    shard: Optional[Callable] = getattr(stream, "shard", None)
    return shard(k, n) if shard else stream[k::n]
