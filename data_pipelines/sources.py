"""Sources by name -> raw record MapDatasets for a split ("train" or "eval").

`image_source(data, split)` gives ImageCaptionRecords; `text_source(data, split)`
gives TextRecords. Held-out data: file sources reserve their first
`data.eval_examples` records for "eval"; the procedural shapes set draws eval
scenes from another seed.

`shapes_edit` (data_pipelines/shapes_edit.py) mixes EditRecords (a share of
data.edit_fraction of the indices) into the shapes pairs, so a fine-tuning run keeps
seeing what it already does; `edit_folder` reads a folder of real edits.
`pair_source` is the image-caption part alone (what generation evaluation prompts from).

`webdataset`, `parquet`, `interleaved` and text files (data_pipelines/web_sources.py)
are sharded files read block by block: they return a shards.ShardedView, which the
pipeline turns into a block-shuffled stream (data_pipelines/shards.py).
`entry_records` gives the records of one mixture entry (data_pipelines/mixture.py).
"""
from __future__ import annotations

from typing import Callable

import grain
import numpy as np

from data_pipelines.builtin_text import digit_caption
from data_pipelines.file_sources import (array_record_records, edit_folder_records,
                                        folder_records)
from data_pipelines.latents_source import records as latent_records
from data_pipelines.mixture import Entry, entry_data
from data_pipelines.records import EditRecord, ImageCaptionRecord, TextRecord
from data_pipelines.shapes import make_scene, render_scene
from data_pipelines.shapes_edit import make_edit
from data_pipelines.shards import ShardedView
from data_pipelines.web_sources import (interleaved_records, parquet_records, text_records,
                                        webdataset_records)

SHAPES_WORLD = ("shapes", "shapes_edit")  # sources whose images the shapes detector reads

SHAPES_SPLIT_SEEDS = {"train": 0, "eval": 1}


def _split(records: grain.MapDataset, data, split: str) -> grain.MapDataset:
    n_eval = data.eval_examples
    if len(records) <= n_eval:
        raise ValueError(f"source has {len(records)} records; data.eval_examples={n_eval} "
                         "leaves none for training")
    if isinstance(records, ShardedView):
        return records.split(0, n_eval) if split == "eval" else records.split(n_eval)
    return records[:n_eval] if split == "eval" else records[n_eval:]


def _shapes_record(index: int, seed: int, max_shapes: int, px: int) -> ImageCaptionRecord:
    scene = make_scene(seed, index, max_shapes)
    return ImageCaptionRecord(render_scene(scene, px), scene.caption(),
                              attributes=scene.attributes())


def _shapes(data, split: str) -> grain.MapDataset:
    seed, n = SHAPES_SPLIT_SEEDS[split], data.num_examples
    if split == "eval":
        n = data.eval_examples
    max_shapes, px = data.shapes_max_per_image, data.image_size
    return grain.MapDataset.range(n).map(lambda i: _shapes_record(i, seed, max_shapes, px))


def edit_record(split: str, index: int, max_shapes: int, px: int) -> EditRecord:
    edit = make_edit(split, index, max_shapes)
    return EditRecord(render_scene(edit.source, px), edit.instruction,
                      render_scene(edit.target, px), kind=edit.kind)


def _shapes_edit(data, split: str) -> grain.MapDataset:
    """Index i is an edit (edit i of the split) when a seeded draw falls below
    data.edit_fraction, else the shapes pair i."""
    pairs = _shapes(data, split)
    fraction, max_shapes, px = data.edit_fraction, data.edit_max_shapes, data.image_size
    seed = SHAPES_SPLIT_SEEDS[split]

    def record(i: int):
        if np.random.default_rng([seed, i, 0xED]).random() < fraction:
            return edit_record(split, i, max_shapes, px)
        return pairs[i]

    return grain.MapDataset.range(len(pairs)).map(record)


def _shapes_captions(data, split: str) -> grain.MapDataset:
    # Captions without rendering: text-only documents cost no pixels.
    seed = SHAPES_SPLIT_SEEDS[split] + 100  # not the paired captions of the image stream
    n = data.eval_examples if split == "eval" else data.num_examples
    max_shapes = data.shapes_max_per_image
    return grain.MapDataset.range(n).map(
        lambda i: TextRecord(make_scene(seed, i, max_shapes).caption()))


def _digits(data, split: str) -> grain.MapDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 8x8 intensities 0..16 -> uint8 RGB (the set is grayscale; stored as RGB so no
    # conversion is counted as a repair).
    images = np.repeat((digits.images * (255.0 / 16.0)).round().astype(np.uint8)[..., None],
                       3, axis=-1)
    pairs = list(zip(images, digits.target.tolist()))
    records = grain.MapDataset.source(pairs).map(
        lambda p: ImageCaptionRecord(p[0], digit_caption(p[1])))
    return _split(records, data, split)


def _tfds(data, split: str) -> grain.MapDataset:
    import tensorflow_datasets as tfds

    source = tfds.data_source(data.tfds_name, split=data.tfds_split,
                              data_dir=data.tfds_data_dir or None, download=False)
    image_key, caption_key = data.tfds_image_key, data.tfds_caption_key

    def to_record(example) -> ImageCaptionRecord:
        try:
            return ImageCaptionRecord(np.asarray(example[image_key]), example[caption_key])
        except Exception as e:
            return ImageCaptionRecord(None, None, error="unreadable_record",
                                      error_detail=f"{type(e).__name__}: {e}")

    return _split(grain.MapDataset.source(source).map(to_record), data, split)


def _folder(data, split):
    return _split(folder_records(data.data_dir), data, split)


def _array_record(data, split):
    return _split(array_record_records(data.data_dir), data, split)


IMAGE_SOURCES: dict[str, Callable[[object, str], grain.MapDataset]] = {
    "shapes": _shapes,
    "digits": _digits,
    "folder": _folder,
    "array_record": _array_record,
    "tfds": _tfds,
    "shapes_edit": _shapes_edit,
    "edit_folder": lambda data, split: _split(edit_folder_records(data.data_dir), data, split),
    "webdataset": lambda data, split: _split(webdataset_records(
        data.data_dir, data.caption_column, data.shuffle_block), data, split),
    "parquet": lambda data, split: _split(parquet_records(
        data.data_dir, data.image_column, data.caption_column, data.shuffle_block), data, split),
    "interleaved": lambda data, split: _split(interleaved_records(
        data.data_dir, data.interleaved_texts_column, data.interleaved_images_column,
        data.shuffle_block), data, split),
    # Latents (and captions) written by launch/encode_latents.py; data.encoder must be
    # "precomputed" and data.encoder_path the directory.
    "precomputed": lambda data, split: latent_records(data.encoder_path, split),
}


def image_source(data, split: str) -> grain.MapDataset:
    return IMAGE_SOURCES[data.source](data, split)


def pair_source(data, split: str) -> grain.MapDataset:
    """The source's image-caption pairs alone (shapes_edit: its shapes pairs)."""
    if data.source == "shapes_edit":
        return _shapes(data, split)
    return image_source(data, split)


def _caption_text(record) -> TextRecord:
    return TextRecord(record.caption, error=record.error, error_detail=record.error_detail,
                      origin=record.origin)


def text_source(data, split: str) -> grain.MapDataset:
    if data.text_source == "files":
        return _split(text_records(data.text_files, data.text_column, data.shuffle_block),
                      data, split)
    if data.text_source == "captions":
        if data.source in SHAPES_WORLD:
            return _shapes_captions(data, split)
        records = image_source(data, split)
        if isinstance(records, ShardedView):  # read in blocks, shuffled by the pipeline
            return records.map_records(_caption_text)
        # Captions of another permutation of the same split: reading a record for its
        # caption alone is cheap (images are decoded later, only for image documents).
        return records.shuffle(seed=SHAPES_SPLIT_SEEDS[split] + 100).map(_caption_text)
    raise ValueError(f"no text source for data.text_source={data.text_source!r}")


def entry_records(data, entry: Entry, split: str) -> grain.MapDataset:
    """The records of one mixture entry for a split."""
    d = entry_data(data, entry)
    if entry.source == "text":
        with d.unlocked():
            d.text_source = "files"
        return text_source(d, split)
    if entry.source == "captions":
        with d.unlocked():
            d.text_source = "captions"
        return text_source(d, split)
    return image_source(d, split)
