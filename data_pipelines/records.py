"""What flows between stages: raw records from sources, and documents to the packer.

Sources yield `ImageCaptionRecord` / `TextRecord` (raw bytes or arrays, possibly
broken). Document builders turn each into a `DocItem`: either a tfusion.batch
Document or a skip reason. Repairs (e.g. a grayscale image converted to RGB) travel
with the DocItem, so the packer can count every record exactly once.

Every skip carries a short human-readable `detail` (where the record came from and
what was wrong), so the first example of each reason can be shown to the user.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from tfusion.batch import Document


MAX_DETAIL_CHARS = 300  # examples travel in every batch's statistics and in state


class BadRecord(Exception):
    """A record cannot be used; `reason` is the statistics key it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class UnusableDataError(RuntimeError):
    """Too many records were skipped for training to do useful work (data.max_* fields).

    Takes only the message, so it pickles unchanged out of grain worker processes.
    """


def located(origin: str, detail: str) -> str:
    """'<where the record came from>: <what was wrong>', cut to MAX_DETAIL_CHARS."""
    text = ": ".join(part for part in (origin, detail) if part)
    return text if len(text) <= MAX_DETAIL_CHARS else text[:MAX_DETAIL_CHARS - 3] + "..."


@dataclasses.dataclass
class ImageCaptionRecord:
    image: Any  # encoded bytes, uint8 array (H, W[, C]) or PIL image; None if unreadable
    caption: Any  # str or raw bytes (decoded leniently later)
    attributes: Optional[list] = None  # ground truth, when the source knows it
    error: str = ""  # set by a source that could not read the record at all
    # Precomputed latent (data_pipelines/latents_source.py); when set, `image` is
    # neither prepared nor encoded.
    latent: Any = None
    error_detail: str = ""  # what exactly was wrong, for the skip example
    origin: str = ""  # where the record came from (file, line), prefixed to skip details


@dataclasses.dataclass
class EditRecord:
    """An image edit: input image, instruction, output image (each image as
    ImageCaptionRecord.image accepts it). Its document is
    BOS BOI <input> EOI instruction BOI <output> EOI EOS, the input a condition image."""

    input: Any
    instruction: Any  # str or raw bytes
    output: Any
    kind: str = ""  # shapes_edit: the edit kind (EDIT_KINDS); "" for real data
    error: str = ""
    error_detail: str = ""
    origin: str = ""


@dataclasses.dataclass
class InterleavedRecord:
    """A web document in reading order: parts ("text", str | bytes) and ("image",
    encoded bytes | array). Its document is BOS text BOI <image> EOI text ... EOS,
    every image a diffusion target."""

    parts: Any  # list of (kind, value); None if unreadable
    error: str = ""
    error_detail: str = ""
    origin: str = ""


@dataclasses.dataclass
class TextRecord:
    text: Any  # str or raw bytes
    error: str = ""
    error_detail: str = ""
    origin: str = ""


@dataclasses.dataclass
class DocItem:
    """One document for the packer, or the reason it was skipped."""

    document: Optional[Document] = None
    skip_reason: str = ""
    repairs: tuple[str, ...] = ()
    detail: str = ""  # skips: which record and what was wrong (see `located`)
    source: str = ""  # the mixture entry it came from (per-source counts)

    @classmethod
    def skipped(cls, reason: str, repairs: tuple[str, ...] = (), detail: str = "") -> "DocItem":
        return cls(document=None, skip_reason=reason, repairs=repairs, detail=detail)


def clean_text(raw: Any, empty_reason: str) -> tuple[str, tuple[str, ...]]:
    """Decodes bytes (invalid UTF-8 replaced and counted) and strips whitespace.

    Raises BadRecord(empty_reason) when nothing is left.
    """
    repairs: tuple[str, ...] = ()
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw)
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raw = raw.decode("utf-8", errors="replace")
            repairs = ("non_utf8_text",)
    if raw is None:
        raise BadRecord(empty_reason)
    if not isinstance(raw, str):
        raise BadRecord("text_not_a_string", type(raw).__name__)
    text = " ".join(raw.split())  # collapse newlines/tabs: captions are one line
    if not text:
        raise BadRecord(empty_reason)
    return text, repairs
