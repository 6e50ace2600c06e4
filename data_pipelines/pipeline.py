"""The trainer's entry points: make_train_iterator / make_eval_iterator.

Graph (grain), per split, for each named source of the mixture (data_pipelines/mixture.py:
by default "image" = data.source and "text" = data.text_source):

  records --shuffle--repeat--> [shard k of n] --> documents (tagged with the name) --\
  records --shuffle--repeat--> [shard k of n] --> documents ...                     --+
      mix(document probabilities) -> PackingIterDataset (B_local rows) -> mp_prefetch

Shard k of n is process p's grain worker w (k = p + process_count * w, n =
process_count * num_workers, one worker when num_workers is 0). Random-access sources
shuffle and shard by record; sharded web sources (data_pipelines/shards.py) shuffle
and shard by blocks of data.shuffle_block records, so each reader reads 1/n of the
bytes. Everything before the packer is a MapDataset, so any document is a pure
function of (config, seed, k, n, index): a given (config, process_count, num_workers)
always yields the same batches, and restored state continues them exactly.

Nothing is lost silently: every record read is counted (packed, or skipped by
reason with the first example of each reason), and a packer whose records break
data.max_records_without_usable / data.max_bad_fraction raises UnusableDataError out
of `next` (grain re-raises a worker's exception, unchanged, in this process).
"""
from __future__ import annotations

import collections
import dataclasses
import zlib
from typing import Iterator, Optional

import grain
import numpy as np

from data_pipelines.documents import (DocumentBuilder, DocumentOptions, image_documents,
                                      text_documents)
from data_pipelines.encoders import resolve as resolve_encoder
from data_pipelines.mixture import (MixedDocuments, Stream, document_probabilities,
                                    mixture_entries, shard_of)
from data_pipelines.packing import EXAMPLES_KEY, STATS_KEY, ImageCapacity, PackingIterDataset
from data_pipelines.shards import BlockShuffledStream, ShardedView
from data_pipelines.sources import entry_records
from data_pipelines.stats import PipelineStats, UsabilityLimits, log_counts
from data_pipelines.tokenizer import Tokenizer, build_tokenizer
from tfusion.batch import BatchSpec, capacity_per_unit, unit_of_row
from tfusion.config import is_discrete


def batch_spec(config, process_count: int = 1) -> BatchSpec:
    """The contract shapes of one process's batches."""
    d, model = config.data, config.model
    if config.train.batch_size % process_count:
        raise ValueError(f"train.batch_size={config.train.batch_size} is not divisible by "
                         f"process_count={process_count}")
    if d.source == "none" or is_discrete(model):
        # No image slots: text-only training, or images travelling as VQ code tokens.
        latent, slots = (model.latent_height, model.latent_width, model.latent_channels), 0
    else:
        latent = resolve_encoder(d.encoder, d.encoder_path).latent_shape(d.image_size)
        slots = d.max_images_per_row
    return BatchSpec(batch_size=config.train.batch_size // process_count, seq_len=d.seq_len,
                     max_images=slots, latent_shape=latent, patch_size=model.patch_size)


# Shuffle salts of the default entries: the values the single image + text pipeline
# always used, so existing configs keep their data order; named entries hash their name.
SEED_SALTS = {"image": 1, "text": 2}


def document_streams(config, split: str, tokenizer: Tokenizer,
                     image_records: Optional[grain.MapDataset] = None,
                     text_records: Optional[grain.MapDataset] = None
                     ) -> tuple[list[Stream], dict[str, int]]:
    """(one infinite Stream per mixture entry, shard problems as log counts
    {data_<name>_unreadable_shards: n, ...}).

    `image_records` / `text_records` replace the records of the entries named "image"
    and "text" (tests, benchmarks).
    """
    d = config.data
    builder = DocumentBuilder(tokenizer, DocumentOptions.from_config(config))
    seed, shuffle = config.train.seed, d.shuffle and split == "train"
    given = {"image": image_records, "text": text_records}
    streams, problems = [], {}
    for entry in mixture_entries(d):
        records = given.get(entry.name)
        if records is None:
            records = entry_records(d, entry, split)
        salt = SEED_SALTS.get(entry.name) or zlib.crc32(entry.name.encode())
        if isinstance(records, ShardedView):
            for kind, shards in (("unreadable", records.base.unreadable_shards),
                                 ("truncated", records.base.truncated_shards)):
                if shards:
                    problems[f"data_{entry.name}_{kind}_shards"] = len(shards)
            stream = BlockShuffledStream(records, seed * 7919 + salt, shuffle)
            pool_block = stream.block
        else:
            if shuffle:
                records = records.shuffle(seed=(seed * 7919 + salt) % 2**32)
            stream, pool_block = records.repeat(), 0  # reshuffled every epoch
        streams.append(Stream(entry.name, entry.weight,
                              _documents_of(stream, entry, builder, pool_block)))
    return streams, problems


def _documents_of(stream, entry, builder: DocumentBuilder, pool_block: int):
    name = entry.name

    def documents(k: int, n: int) -> grain.MapDataset:
        shard = shard_of(stream, k, n)
        docs = (text_documents(shard, builder) if entry.is_text
                else image_documents(shard, builder, pool_block))
        return docs.map(lambda item: dataclasses.replace(item, source=name))

    return documents


class PipelineIterator(Iterator[dict]):
    """Yields contract batches (dict of numpy arrays); get_state/set_state are JSON-able.

    Pipeline statistics arrive inside each batch from the (possibly remote) packers
    and are summed here, so they cover exactly the batches this iterator returned;
    so do the skip examples (first example of each reason wins).
    """

    def __init__(self, dataset: grain.IterDataset, spec: BatchSpec, pad_id: int,
                 weights: dict, num_batches: Optional[int] = None,
                 shard_problems: Optional[dict] = None):
        self.spec, self.pad_id, self.mixture_weights = spec, pad_id, weights
        self._shard_problems = dict(shard_problems or {})
        self._dataset = dataset
        self._it = iter(dataset)
        self._num_batches = num_batches
        self._produced = 0
        self._totals: collections.Counter = collections.Counter()
        self._examples: dict[str, str] = {}

    def __next__(self) -> dict:
        if self._num_batches is not None and self._produced >= self._num_batches:
            raise StopIteration
        batch = next(self._it)
        self._totals.update(batch.pop(STATS_KEY))
        for reason, detail in batch.pop(EXAMPLES_KEY, {}).items():
            self._examples.setdefault(reason, detail)
        self._produced += 1
        return {k: np.asarray(v) for k, v in batch.items()}

    def get_state(self) -> dict:
        return {"grain": self._it.get_state(), "totals": dict(self._totals),
                "examples": dict(self._examples), "produced": self._produced}

    def set_state(self, state: dict) -> None:
        self._it.set_state(state["grain"])
        self._totals = collections.Counter({k: int(v) for k, v in state["totals"].items()})
        self._examples = dict(state.get("examples", {}))  # absent in older checkpoints
        self._produced = int(state["produced"])

    def stats(self) -> PipelineStats:
        return PipelineStats.from_counts(self._totals)

    def data_counts(self) -> dict[str, int]:
        """Cumulative counts over the batches returned so far, for the trainer's log:
        data_records_read, data_skipped_<reason>, data_repaired_<repair>, the same per
        mixture entry (data_<name>_records_read, data_<name>_skipped_<reason>), and
        the shards each entry could not open or read whole (fixed at start-up)."""
        return {**log_counts(self._totals), **self._shard_problems}

    def skip_examples(self) -> dict[str, str]:
        """Skip reason -> where and why its first skipped record failed."""
        return dict(self._examples)

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close:
            close()


def image_capacity(config, process_count: int, image_groups: int) -> Optional[ImageCapacity]:
    """data.image_capacity_per_row as the packer's per-unit limit: the batch's rows form
    image_groups device groups (process_count processes hold equal shares), each split
    into train.grad_accum_steps microbatch units; None when off."""
    per_row = config.data.get("image_capacity_per_row", 0.0)
    if not per_row:
        return None
    accum = config.train.get("grad_accum_steps", 1)
    if image_groups % process_count:
        raise ValueError(f"{image_groups} image groups do not split over {process_count} "
                         "processes")
    rows = config.train.batch_size // process_count
    devices = image_groups // process_count
    if rows % (devices * accum):
        raise ValueError(f"{rows} rows per process do not split into {devices} devices x "
                         f"{accum} microbatches")
    return ImageCapacity(tuple(unit_of_row(rows, devices, accum)),
                         capacity_per_unit(per_row, rows // (devices * accum)), per_row)


def _ensure_absl_flags_parsed() -> None:
    # grain's mp_prefetch reads absl flags; a trainer that is not an absl app has
    # not parsed them, and reading unparsed flags raises.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _make_iterator(config, split: str, process_index: int, process_count: int,
                   num_batches: Optional[int], image_records=None, text_records=None,
                   image_groups: int = 1) -> PipelineIterator:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    d = config.data
    tokenizer = build_tokenizer(config)
    spec = batch_spec(config, process_count)
    streams, problems = document_streams(config, split, tokenizer, image_records,
                                         text_records)
    weights = document_probabilities(streams, d.mixture_probe_docs, spec.patches_per_image)
    docs = MixedDocuments(streams, weights, process_index, process_count)
    dataset = PackingIterDataset(docs, spec, tokenizer.pad_id, d.packing_open_rows,
                                 d.min_text_chunk, UsabilityLimits.from_config(d),
                                 image_capacity(config, process_count, image_groups))
    workers = d.num_workers if split == "train" else 0
    if workers > 0:
        _ensure_absl_flags_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=d.worker_buffer_size))
    return PipelineIterator(dataset, spec, tokenizer.pad_id, weights, num_batches, problems)


def make_train_iterator(config, *, process_index: int = 0, process_count: int = 1,
                        image_records=None, text_records=None,
                        image_groups: int = 1) -> PipelineIterator:
    """Infinite iterator of this process's batches (train.batch_size // process_count
    rows). image_groups: the mesh's batch shards, the device groups of
    data.image_capacity_per_row (the trainer passes it)."""
    return _make_iterator(config, "train", process_index, process_count, None,
                          image_records, text_records, image_groups)


def make_eval_iterator(config, *, process_index: int = 0, process_count: int = 1,
                       image_records=None, text_records=None,
                       image_groups: int = 1) -> PipelineIterator:
    """Held-out split, unshuffled, in-process: exactly data.eval_batches batches, the
    same ones on every call."""
    return _make_iterator(config, "eval", process_index, process_count,
                          config.data.eval_batches, image_records, text_records, image_groups)
