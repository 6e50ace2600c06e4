"""Examples -> tfusion.batch Documents, with all randomness drawn from (seed, index).

Image documents (one caption order drawn per image):
  caption first (1 - image_first_fraction):  BOS caption BOI <image> EOI EOS, t_max = T-1
  image first (image_first_fraction):        BOS BOI <image> EOI caption EOS,
                                             t_max = diffusion.noise_limit_t (noise limiting)
  caption dropped (cfg_dropout, for CFG):    BOS BOI <image> EOI EOS, t_max = T-1
Edit documents (EditRecord, data_pipelines/shapes_edit.py):
  BOS BOI <input> EOI instruction BOI <output> EOI EOS (data.edit_instruction_position
  "after_input"; "before_input": BOS instruction BOI <input> EOI BOI <output> EOI EOS):
  the input is a condition image (t_max = tfusion.batch.CONDITION: clean, no
  diffusion loss), the output a target with t_max = T-1; with edit_instruction_dropout
  the instruction is left out. tfusion.inference.model_sampler.edit_prompt writes the
  same prefix for generation.
Multi-image documents (multi_image_fraction) chain 2..max_images_per_document such
pieces between one BOS and one EOS. Web documents (InterleavedRecord, the
"interleaved" source) keep their own reading order: BOS text BOI <image> EOI text ...
EOS, every image a target with t_max = T-1 (a document longer than a row, or with more
images than its slots, is skipped and counted by the packer, never cut). Text
documents are BOS text EOS.

The discrete (Chameleon) baseline draws the same documents, but <image> is the
image's VQ code ids shifted past the text vocabulary (code c -> token
image_token_offset + c), inside the text like any token; there is no t_max.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import grain
import numpy as np

from data_pipelines.encoders import resolve as resolve_encoder
from data_pipelines.images import prepare_image
from data_pipelines.records import (BadRecord, DocItem, EditRecord, ImageCaptionRecord,
                                    InterleavedRecord, TextRecord, clean_text, located)
from data_pipelines.tokenizer import Tokenizer
from tfusion.batch import CONDITION, ImageSegment
from tfusion.config import image_token_offset

_IMAGE_STREAM = 1  # rng stream id, so other streams can draw independently later
_EDIT_STREAM = 2


@dataclasses.dataclass(frozen=True)
class DocumentOptions:
    image_size: int
    encoder: str
    encoder_path: str
    image_first_fraction: float
    cfg_dropout: float
    noise_limit_t: int
    full_t_max: int  # diffusion.num_train_steps - 1
    multi_image_fraction: float
    max_images_per_document: int
    seed: int
    image_token_offset: Optional[int] = None  # discrete baseline: token id of VQ code 0
    codebook_size: int = 0
    edit_instruction_dropout: float = 0.0
    edit_instruction_position: str = "after_input"

    @classmethod
    def from_config(cls, config) -> "DocumentOptions":
        d, diffusion = config.data, config.diffusion
        return cls(image_size=d.image_size, encoder=d.encoder, encoder_path=d.encoder_path,
                   image_first_fraction=d.image_first_fraction,
                   cfg_dropout=diffusion.cfg_dropout, noise_limit_t=diffusion.noise_limit_t,
                   full_t_max=diffusion.num_train_steps - 1,
                   multi_image_fraction=d.multi_image_fraction,
                   max_images_per_document=d.max_images_per_document, seed=config.train.seed,
                   image_token_offset=image_token_offset(config.model),
                   codebook_size=int(config.model.get("codebook_size", 0)),
                   edit_instruction_dropout=d.get("edit_instruction_dropout", 0.0),
                   edit_instruction_position=d.get("edit_instruction_position", "after_input"))


class DocumentBuilder:
    def __init__(self, tokenizer: Tokenizer, options: DocumentOptions):
        self.tok, self.opt = tokenizer, options
        self.encode = resolve_encoder(options.encoder, options.encoder_path).encode

    def _caption_ids(self, raw) -> tuple[list[int], tuple[str, ...]]:
        text, repairs = clean_text(raw, "empty_caption")
        return self.tok.encode(text), repairs

    def _image(self, record: ImageCaptionRecord):
        if record.error:
            raise BadRecord(record.error, record.error_detail)
        caption, caption_repairs = self._caption_ids(record.caption)
        if record.latent is not None:  # precomputed: the encoder already ran offline
            return record.latent, caption, caption_repairs
        pixels, repairs = prepare_image(record.image, self.opt.image_size)
        return self.encode(pixels), caption, repairs + caption_repairs

    def image_document(self, index: int, record: ImageCaptionRecord, pool,
                       pool_block: int = 0) -> DocItem:
        """Document `index` of an image stream; extra images of multi-image documents
        come from `pool` (the same stream) at seeded random positions: anywhere, or
        with `pool_block` > 0 within index's block of that many (a block-read stream,
        whose block is then already in memory)."""
        if isinstance(record, EditRecord):
            return self.edit_document(index, record)
        if isinstance(record, InterleavedRecord):
            return self.interleaved_document(record)
        opt = self.opt
        rng = np.random.default_rng([opt.seed, _IMAGE_STREAM, index])
        records = [record]
        if opt.max_images_per_document > 1 and rng.random() < opt.multi_image_fraction:
            extra = int(rng.integers(1, opt.max_images_per_document))
            if pool_block:
                first = index - index % pool_block
                positions = first + rng.integers(0, pool_block, extra)
            else:
                positions = rng.integers(0, min(len(pool), 2**62), extra)
            records += [pool[int(j)] for j in positions]
        repairs: tuple[str, ...] = ()
        segments, pending = [], [self.tok.bos_id]
        for rec in records:
            try:
                latent, caption, fixes = self._image(rec)
            except BadRecord as e:
                return _skipped(e, rec, repairs)
            repairs += fixes
            image_first = rng.random() < opt.image_first_fraction
            dropped = rng.random() < opt.cfg_dropout
            t_max = opt.full_t_max
            if dropped:
                before, after = [], []
            elif image_first:
                before, after, t_max = [], caption, opt.noise_limit_t
            else:
                before, after = caption, []
            if opt.image_token_offset is None:
                segments.append(np.asarray(pending + before + [self.tok.boi_id], np.int32))
                segments.append(ImageSegment(latent=latent, t_max=t_max))
                pending = [self.tok.eoi_id] + after
                continue
            try:
                codes = self._code_tokens(latent)
            except BadRecord as e:
                return _skipped(e, rec, repairs)
            pending = pending + before + [self.tok.boi_id] + codes + [self.tok.eoi_id] + after
        segments.append(np.asarray(pending + [self.tok.eos_id], np.int32))
        return DocItem(document=segments, repairs=repairs)

    def edit_document(self, index: int, record: EditRecord) -> DocItem:
        """BOS BOI <input: condition> EOI instruction BOI <output> EOI EOS."""
        opt, tok = self.opt, self.tok
        try:
            if record.error:
                raise BadRecord(record.error, record.error_detail)
            instruction, repairs = self._caption_ids(record.instruction)
            latents = []
            for image in (record.input, record.output):
                pixels, fixes = prepare_image(image, opt.image_size)
                latents.append(self.encode(pixels))
                repairs += fixes
        except BadRecord as e:
            return _skipped(e, record)
        rng = np.random.default_rng([opt.seed, _EDIT_STREAM, index])
        if rng.random() < opt.edit_instruction_dropout:
            instruction = []
        before, after = ((instruction, []) if opt.edit_instruction_position == "before_input"
                         else ([], instruction))
        segments = [np.asarray([tok.bos_id] + before + [tok.boi_id], np.int32),
                    ImageSegment(latent=latents[0], t_max=CONDITION),
                    np.asarray([tok.eoi_id] + after + [tok.boi_id], np.int32),
                    ImageSegment(latent=latents[1], t_max=opt.full_t_max),
                    np.asarray([tok.eoi_id, tok.eos_id], np.int32)]
        return DocItem(document=segments, repairs=repairs)

    def interleaved_document(self, record: InterleavedRecord) -> DocItem:
        """BOS text BOI <image> EOI text ... EOS in the record's reading order."""
        if self.opt.image_token_offset is not None:
            return _skipped(BadRecord("interleaved_not_discrete", "the discrete baseline "
                                      "does not read web documents"), record)
        tok, repairs = self.tok, ()
        segments, pending = [], [tok.bos_id]
        try:
            if record.error:
                raise BadRecord(record.error, record.error_detail)
            if not any(kind == "image" for kind, _ in record.parts):
                raise BadRecord("no_image_in_document")
            for kind, value in record.parts:
                if kind == "text":
                    text, fixes = clean_text(value, "empty_text")
                    pending += tok.encode(text)
                else:
                    pixels, fixes = prepare_image(value, self.opt.image_size)
                    segments.append(np.asarray(pending + [tok.boi_id], np.int32))
                    segments.append(ImageSegment(latent=self.encode(pixels),
                                                 t_max=self.opt.full_t_max))
                    pending = [tok.eoi_id]
                repairs += fixes
        except BadRecord as e:
            return _skipped(e, record, repairs)
        segments.append(np.asarray(pending + [tok.eos_id], np.int32))
        return DocItem(document=segments, repairs=repairs)

    def _code_tokens(self, codes) -> list[int]:
        """VQ code ids [h, w, 1] (raster order) -> token ids past the text vocabulary."""
        codes = np.asarray(codes)
        if not np.issubdtype(codes.dtype, np.integer):
            raise BadRecord("vq_codes_not_integer")
        flat = codes.reshape(-1).astype(np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= self.opt.codebook_size):
            raise BadRecord("vq_code_out_of_range")
        return (flat + self.opt.image_token_offset).tolist()

    def text_document(self, record: TextRecord) -> DocItem:
        """BOS text EOS; a pre-tokenized record (an int array) is used as its ids."""
        try:
            if record.error:
                raise BadRecord(record.error, record.error_detail)
            if isinstance(record.text, np.ndarray):
                ids, repairs = self._token_ids(record.text), ()
            else:
                text, repairs = clean_text(record.text, "empty_text")
                ids = self.tok.encode(text)
        except BadRecord as e:
            return _skipped(e, record)
        ids = [self.tok.bos_id] + list(ids) + [self.tok.eos_id]
        return DocItem(document=[np.asarray(ids, np.int32)], repairs=repairs)

    def _token_ids(self, ids: np.ndarray) -> np.ndarray:
        if not ids.size:
            raise BadRecord("empty_text")
        if ids.min() < 0 or ids.max() >= self.tok.vocab_size:
            raise BadRecord("token_id_out_of_range", f"ids in [{ids.min()}, {ids.max()}], the "
                            f"tokenizer has {self.tok.vocab_size}")
        return ids


def _skipped(error: BadRecord, record, repairs: tuple[str, ...] = ()) -> DocItem:
    return DocItem.skipped(error.reason, repairs, located(record.origin, error.detail))


def image_documents(records: grain.MapDataset, builder: DocumentBuilder,
                    pool_block: int = 0) -> grain.MapDataset:
    return records.map_with_index(
        lambda i, r: builder.image_document(i, r, records, pool_block))


def text_documents(records: grain.MapDataset, builder: DocumentBuilder) -> grain.MapDataset:
    return records.map(builder.text_document)
