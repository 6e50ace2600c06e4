"""Data config (`config.data`) and its start-up validation.

`data_config()` holds every field with its meaning; `shapes_tiny_data()` is the
tiny CPU default (shapes at 16 px through the identity encoder: latent 16x16x3, so
with model.patch_size=2 an image is 64 patches). `validate_data_config(config)`
takes the whole experiment config because several checks compare data fields with
model/diffusion/train fields.
"""
from __future__ import annotations

import ml_collections

from tfusion.config import ConfigError, image_token_offset

IMAGE_SOURCES = ("shapes", "shapes_edit", "digits", "folder", "edit_folder", "array_record",
                 "tfds", "precomputed", "webdataset", "parquet", "interleaved", "none")
SHARDED_SOURCES = ("webdataset", "parquet", "interleaved")  # data_dir: a glob of shards
EDIT_SOURCES = ("shapes_edit", "edit_folder")  # documents with a condition image
EDIT_INSTRUCTION_POSITIONS = ("after_input", "before_input")
TEXT_SOURCES = ("captions", "files", "none")


def data_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # --- rows (the batch contract's L and M; B is config.train.batch_size) ---
    c.seq_len = 256  # L: sequence positions per packed row
    c.max_images_per_row = 4  # M: image slots per row; rows never hold more images
    # --- image-caption source ---
    c.source = "shapes"  # one of IMAGE_SOURCES; "none" = text-only training
    c.image_size = 16  # images are centre-cropped and resized to this many px (square)
    # Latent encoder (data_pipelines/encoders.py; docs/latents.md):
    #   "identity": pixels are the latents (px, px, 3), for tiny runs;
    #   "vae": AutoencoderKL weights in diffusers format at encoder_path, run on the fly;
    #   "vq": VQ-VAE weights at encoder_path -> token ids [h, w, 1] (discrete baseline);
    #   "precomputed": latents written by launch/encode_latents.py at encoder_path
    #                  (needs source="precomputed"; the encoder never runs in training).
    c.encoder = "identity"
    c.encoder_path = ""  # vae/vq: weights directory; precomputed: latents directory
    # folder source: a directory of images + captions.jsonl, one JSON object per line
    # naming the image file under "file", "file_name", "image" or "path" and its
    # caption under "caption" or "text" (first present wins; checked at start-up on
    # the first 20 lines); array_record source: a file glob. Sharded sources
    # (data_pipelines/web_sources.py; local or gs://, s3://, any fsspec URL; several
    # globs comma-separated): webdataset = .tar shards (img2dataset's layout),
    # parquet = .parquet files (Hugging Face datasets' layout), interleaved = .parquet
    # or .jsonl web documents with a texts and an images list.
    c.data_dir = ""
    c.image_column = "image"  # parquet: column of image bytes or {"bytes": ...} structs
    # parquet: caption column; webdataset: caption key of the .json member when there
    # is no .txt member ("text" is tried when this one is absent, in both)
    c.caption_column = "caption"
    c.interleaved_texts_column = "texts"  # interleaved: list of texts (null at images)
    c.interleaved_images_column = "images"  # interleaved: list of images (null at texts)
    # Sharded sources are read in blocks of this many records: per epoch the blocks go
    # in a seeded order and each block's records in a seeded order; each process and
    # grain worker reads every n-th block. Bigger = fewer reads, more host memory
    # (a few blocks are cached per reader).
    c.shuffle_block = 256
    c.tfds_name = ""  # tfds source: dataset name read with tfds.data_source (no download)
    c.tfds_data_dir = ""  # tfds source: data_dir holding the prepared dataset
    c.tfds_split = "train"  # tfds source: split to read (held-out rows come from it too)
    c.tfds_image_key = "image"  # tfds source: feature holding the image
    c.tfds_caption_key = "caption"  # tfds source: feature holding the caption (str/bytes)
    c.num_examples = 1_000_000  # shapes: procedural training set size (any index renders)
    c.shapes_max_per_image = 3  # shapes: 1..this many shapes per image (<= 9 grid cells)
    # --- image editing (docs/editing.md) ---
    # shapes_edit: this share of the records are edits (data_pipelines/shapes_edit.py),
    # the rest shapes pairs as source="shapes" draws them; edit_folder: every record.
    c.edit_fraction = 0.5
    c.edit_max_shapes = 3  # shapes_edit scenes hold 1..this many objects (>= 2)
    # Edit documents without their instruction (BOS BOI <input> EOI BOI <output> EOI
    # EOS): the image-conditioned unconditional branch of instruction guidance.
    c.edit_instruction_dropout = 0.1
    # Where the instruction stands: "after_input" (the paper's order, BOS BOI <input>
    # EOI instruction BOI <output> ...) or "before_input" (BOS instruction BOI <input>
    # EOI BOI <output> ...: every output patch then sits a fixed distance from its
    # input patch, whatever the instruction's length).
    c.edit_instruction_position = "after_input"
    # Examples held out for make_eval_iterator: the first `eval_examples` records of
    # a file source, or a separately seeded shapes set (never seen in training).
    c.eval_examples = 256
    c.eval_batches = 4  # make_eval_iterator yields exactly this many batches
    # --- documents (paper: caption first 80%, image first 20% with noise limiting) ---
    c.image_first_fraction = 0.2  # image-first docs get t_max = diffusion.noise_limit_t
    # Interleaved documents: this fraction of image docs hold several captioned images
    # (2..max_images_per_document), each image followed by its own caption order draw.
    c.multi_image_fraction = 0.0
    c.max_images_per_document = 2
    # --- text-only source ---
    c.text_source = "captions"  # "captions": captions of the image source as plain text;
    #                             "files": text corpus at text_files; "none"
    # Glob(s) of .txt (a document per non-empty line), .jsonl, .jsonl.gz, .parquet or
    # pre-tokenized .array_record shards (web_sources.write_token_shard), read block by
    # block (memory does not grow with the corpus).
    c.text_files = ""
    c.text_column = "text"  # .jsonl key / .parquet column holding the document text
    # --- many sources (data_pipelines/mixture.py) ---
    # A list of {"name", "source", "data_dir", "weight"} entries (a JSON string on the
    # command line), source = an image source, "text" (a corpus at data_dir) or
    # "captions"; weights are token shares; other keys override that entry's data
    # fields. Empty: source + text_source weighted by text_token_share.
    c.mixture = ""
    # --- mixture (paper: 1:1 text : image tokens) ---
    # Share of packed tokens that come from text-only documents. Sampling weights
    # are this share divided by each stream's expected tokens per document (measured
    # on the first `mixture_probe_docs` documents), so 0.5 means equal token counts.
    c.text_token_share = 0.5
    c.mixture_probe_docs = 64
    # --- tokenizer ---
    # "builtin" (trained from built-in captions), a sentencepiece .model path, or a
    # Hugging Face tokenizer.json (or its directory; specials from tokenizer_config.json)
    c.tokenizer = "builtin"
    c.tokenizer_vocab_size = 512  # builtin tokenizer size (incl. 256 byte-fallback pieces)
    c.tokenizer_cache_dir = ""  # where the builtin model is cached; "" = ~/.cache/tfusion
    # --- packing ---
    # Rows kept open by the first-fit packer; more rows = denser packing, more memory.
    # 0 = 2 * local batch size.
    c.packing_open_rows = 0
    c.min_text_chunk = 16  # text documents are split to fill a row only in chunks >= this
    # Image capacity: the model runs its modality layers on at most this many images
    # per row on average (ceil(x * rows) per device and microbatch), not on all
    # max_images_per_row slots; the packer fills batches to fit (rows that do not fit
    # wait a batch, counted as data_deferred_image_capacity). 0 = every slot. Must leave
    # room for a full row: x * rows per unit >= max_images_per_row.
    c.image_capacity_per_row = 0.0
    # --- throughput ---
    c.shuffle = True  # shuffle records (per epoch, seeded by train.seed)
    c.num_workers = 0  # grain mp_prefetch worker processes; 0 = in-process
    c.worker_buffer_size = 2  # batches each worker prepares ahead
    # --- giving up on unusable data (checked by each packer on the records it reads:
    # with num_workers > 0, per worker) ---
    # Stop with UnusableDataError once this many records were read and not one was
    # usable (all skipped: corrupt, empty, too long...); 0 = never.
    c.max_records_without_usable = 1000
    # Stop once more than this fraction of the last `bad_fraction_window` records read
    # was skipped (checked from the window-th record on); 1.0 = never.
    c.max_bad_fraction = 0.5
    c.bad_fraction_window = 1000
    return c


def shapes_tiny_data() -> ml_collections.ConfigDict:
    """Tiny CPU run: shapes at 16 px, identity latents 16x16x3 (64 patches at patch 2).

    Pair with model latent_height=latent_width=16, latent_channels=3, patch_size=2 and
    vocab_size >= 512 (builtin tokenizer 512 pieces + BOI/EOI appended = 514).
    """
    c = data_config()
    c.seq_len = 256
    c.max_images_per_row = 4
    c.image_size = 16
    c.multi_image_fraction = 0.1
    c.tokenizer_vocab_size = 512
    return c


def _fail(field: str, message: str):
    raise ConfigError(f"data.{field}", message)


def validate_data_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first bad `data.` field of a full experiment config."""
    d = config.data
    for field in ("seq_len", "image_size", "eval_batches", "max_images_per_document",
                  "tokenizer_vocab_size", "mixture_probe_docs", "worker_buffer_size",
                  "bad_fraction_window"):
        if not isinstance(d[field], int) or d[field] <= 0:
            _fail(field, f"must be a positive int, got {d[field]!r}")
    for field in ("max_images_per_row", "num_workers", "packing_open_rows", "min_text_chunk",
                  "eval_examples", "multi_image_fraction", "max_records_without_usable"):
        if d[field] < 0:
            _fail(field, f"must be >= 0, got {d[field]!r}")
    if d.source not in IMAGE_SOURCES:
        _fail("source", f"unknown {d.source!r}; choose from {IMAGE_SOURCES}")
    if d.text_source not in TEXT_SOURCES:
        _fail("text_source", f"unknown {d.text_source!r}; choose from {TEXT_SOURCES}")
    if d.source == "none" and d.text_source in ("none", "captions"):
        _fail("text_source", "text-only training needs text_source='files'")
    if d.text_source == "files" and not d.text_files:
        _fail("text_files", "text_source='files' needs a glob of .txt/.jsonl files")
    if d.source in ("folder", "array_record", "edit_folder") + SHARDED_SOURCES and not d.data_dir:
        _fail("data_dir", f"source={d.source!r} needs data_dir")
    _validate_image_capacity(config)
    if d.shuffle_block < 1:
        _fail("shuffle_block", f"must be >= 1, got {d.shuffle_block}")
    if d.source in SHARDED_SOURCES:
        _validate_glob("data_dir", d.data_dir)
    if d.source == "interleaved" and d.text_source == "captions" and not d.mixture:
        _fail("text_source", "interleaved records are documents, not captioned images: use "
                             "'none' or 'files'")
    if d.text_source == "files":
        _validate_glob("text_files", d.text_files)
    if d.mixture:
        _validate_mixture(config)
    if d.source == "folder":
        _validate_folder(d.data_dir)
    if (d.source == "precomputed") != (d.encoder == "precomputed"):
        _fail("encoder", "source='precomputed' and encoder='precomputed' go together, got "
                         f"source={d.source!r}, encoder={d.encoder!r}")
    if d.source == "tfds" and not d.tfds_name:
        _fail("tfds_name", "source='tfds' needs tfds_name")
    for field in ("image_first_fraction", "text_token_share"):
        if not 0.0 <= d[field] <= 1.0:
            _fail(field, f"{d[field]} outside [0, 1]")
    if not 0.0 < d.max_bad_fraction <= 1.0:
        _fail("max_bad_fraction", f"{d.max_bad_fraction} outside (0, 1] (1 = never stop)")
    if d.multi_image_fraction > 1.0:
        _fail("multi_image_fraction", f"{d.multi_image_fraction} outside [0, 1]")
    for field in ("edit_fraction", "edit_instruction_dropout"):
        if not 0.0 <= d[field] <= 1.0:
            _fail(field, f"{d[field]} outside [0, 1]")
    if d.edit_instruction_position not in EDIT_INSTRUCTION_POSITIONS:
        _fail("edit_instruction_position", f"unknown {d.edit_instruction_position!r}; choose "
                                           f"from {EDIT_INSTRUCTION_POSITIONS}")
    if d.source in EDIT_SOURCES:
        _validate_edits(config)
    if not 1 <= d.shapes_max_per_image <= 9:
        _fail("shapes_max_per_image", f"{d.shapes_max_per_image} outside [1, 9] (3x3 grid)")
    if config.train.batch_size <= 0:
        raise ConfigError("train.batch_size", f"must be positive, got {config.train.batch_size}")
    _validate_against_model(config)


def _validate_image_capacity(config) -> None:
    """The capacity must take a full row into an otherwise empty unit (rows per unit
    depend on the mesh; the trainer checks the resolved unit again at start-up)."""
    d = config.data
    per_row = d.image_capacity_per_row
    if per_row < 0 or per_row > d.max_images_per_row:
        _fail("image_capacity_per_row", f"{per_row} outside [0, max_images_per_row="
                                        f"{d.max_images_per_row}] (0 = every slot)")


def _validate_mixture(config) -> None:
    """Each entry's source is known and its data config valid (as if it were the run's
    only source: its data_dir, overrides and what the model needs)."""
    from data_pipelines.mixture import TEXT_ENTRY_SOURCES, entry_data, mixture_entries

    d = config.data
    for i, entry in enumerate(mixture_entries(d)):
        if entry.source not in IMAGE_SOURCES[:-1] + TEXT_ENTRY_SOURCES:
            _fail(f"mixture[{i}].source", f"unknown {entry.source!r}; choose from "
                                          f"{IMAGE_SOURCES[:-1] + TEXT_ENTRY_SOURCES}")
        if entry.source == "text" and not entry.data_dir:
            _fail(f"mixture[{i}].data_dir", "a text entry needs a glob of text shards")
        if entry.source == "captions" and d.source in ("none", "interleaved"):
            _fail(f"mixture[{i}].source", f"'captions' reads the captions of data.source, "
                                          f"and {d.source!r} has none")
        single = config.copy_and_resolve_references()
        with single.unlocked():
            single.data = entry_data(d, entry)
            single.data.mixture = ""
            if entry.is_text:
                single.data.text_source = "files" if entry.source == "text" else "captions"
                single.data.text_token_share = 1.0
            else:
                single.data.text_source, single.data.text_token_share = "none", 0.0
        try:
            validate_data_config(single)
        except ConfigError as e:
            _fail(f"mixture[{i}]", f"entry {entry.name!r}: {e}")


def _validate_edits(config) -> None:
    """An edit document holds two images and never joins an interleaved one."""
    d = config.data
    if image_token_offset(config.model) is not None:
        _fail("source", f"{d.source!r}: condition images are latents in image slots; the "
                        "discrete (VQ token) baseline has none")
    if d.multi_image_fraction:
        _fail("multi_image_fraction", f"{d.source!r} documents are edits or single pairs: "
                                      f"set it to 0, got {d.multi_image_fraction}")
    if d.max_images_per_row < 2:
        _fail("max_images_per_row", f"an edit document holds 2 images, got {d.max_images_per_row}")
    if not 2 <= d.edit_max_shapes <= 9:
        _fail("edit_max_shapes", f"{d.edit_max_shapes} outside [2, 9]")
    if d.source == "edit_folder" and d.text_source == "captions":
        _fail("text_source", "edit_folder records have instructions, not captions: use "
                             "'none' or 'files'")
    if d.source == "edit_folder":
        import os
        from data_pipelines.file_sources import EDITS_FILE
        from data_pipelines.paths import exists
        if not exists(os.path.join(d.data_dir, EDITS_FILE)):
            _fail("data_dir", f"{d.data_dir} has no {EDITS_FILE} (the edit_folder layout)")


def _validate_glob(field: str, patterns: str) -> None:
    from data_pipelines.paths import expand

    try:
        expand(patterns)
    except FileNotFoundError as e:
        _fail(field, str(e))


def _validate_folder(data_dir: str) -> None:
    # Late import: file_sources pulls in grain, which configs alone do not need.
    from data_pipelines.file_sources import folder_problem

    problem = folder_problem(data_dir)
    if problem:
        _fail("data_dir", problem)


def _validate_against_model(config: ml_collections.ConfigDict) -> None:
    """Checks that need the encoder, the tokenizer or the model config."""
    # Late imports of the modules themselves, never the package (which imports this
    # one): the encoders pull in the image codecs and the tokenizer sentencepiece, which
    # experiment configs (importing this module for data_config()) do not need.
    import data_pipelines.encoders as encoders
    from data_pipelines.tokenizer import build_tokenizer

    d, model = config.data, config.model
    code_offset = image_token_offset(model)  # None unless images are VQ code tokens
    if d.source != "none":
        if d.encoder not in encoders.names():
            _fail("encoder", f"unknown {d.encoder!r}; choose from {encoders.names()}")
        if d.encoder in encoders.PATH_ENCODERS:
            problem = encoders.check_path(d.encoder, d.encoder_path)
            if problem:
                _fail("encoder_path", problem)
        try:
            latent = encoders.resolve(d.encoder, d.encoder_path).latent_shape(d.image_size)
        except ValueError as e:  # image size not divisible / not the encoded size
            _fail("image_size", str(e))
        if code_offset is not None:
            _validate_discrete_images(d, model, latent)
        else:
            _validate_continuous_images(d, model, latent)
    tok = build_tokenizer(config)
    if code_offset is not None and tok.vocab_size > code_offset:
        _fail("tokenizer", f"tokenizer has {tok.vocab_size} ids (BOI/EOI included) but VQ "
                           f"codes start at id {code_offset} (model.vocab_size "
                           f"- model.codebook_size)")
    if tok.vocab_size > model.vocab_size:
        _fail("tokenizer", f"tokenizer has {tok.vocab_size} ids (BOI/EOI included) but "
                           f"model.vocab_size is {model.vocab_size}")
    if tok.pad_id != model.pad_id:
        _fail("tokenizer", f"tokenizer pad id {tok.pad_id} != model.pad_id {model.pad_id}")


def _validate_discrete_images(d, model, latent) -> None:
    """Chameleon-style images: VQ code ids [h, w, 1], image_tokens of them, no slots."""
    if d.encoder not in ("vq", "precomputed"):
        _fail("encoder", f"discrete images (model.image_representation) need VQ code ids: "
                         f"encoder 'vq' or 'precomputed' VQ ids, got {d.encoder!r}")
    if len(latent) != 3 or latent[2] != 1 or latent[0] * latent[1] != model.image_tokens:
        _fail("image_size", f"encoder {d.encoder!r} at {d.image_size} px gives codes {latent}, "
                            f"but model.image_tokens is {model.image_tokens}")
    if d.max_images_per_row:
        _fail("max_images_per_row", "discrete images travel as tokens: no image slots (0)")
    if model.image_tokens + 4 > d.seq_len:
        _fail("seq_len", f"{d.seq_len} cannot hold one {model.image_tokens}-token image document")


def _validate_continuous_images(d, model, latent) -> None:
    """Transfusion images: latents of the model's shape, in image slots."""
    expected = (model.latent_height, model.latent_width, model.latent_channels)
    if latent != expected:
        _fail("image_size", f"encoder {d.encoder!r} at {d.image_size} px gives latents "
                            f"{latent}, but model latent (H, W, C) is {expected}")
    patches = (latent[0] // model.patch_size) * (latent[1] // model.patch_size)
    if d.max_images_per_row < 1:
        _fail("max_images_per_row", "image training needs at least one image slot")
    if patches + 4 > d.seq_len:
        _fail("seq_len", f"{d.seq_len} cannot hold one {patches}-patch image document")
    if d.max_images_per_document > d.max_images_per_row:
        _fail("max_images_per_document", f"{d.max_images_per_document} > "
                                          f"max_images_per_row={d.max_images_per_row}")
