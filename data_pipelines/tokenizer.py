"""Sentencepiece tokenizer with the Transfusion special ids (PAD/BOS/EOS/BOI/EOI).

Two ways in:
  * `load_tokenizer(path)`: any existing `.model` (e.g. Llama 2's). Missing BOI/EOI
    pieces get ids appended past its vocabulary (Llama 2: 32000, 32001); a model
    without a pad piece (Llama 2) uses `pad_id` (default 0 = config.model.pad_id).
  * `train_tokenizer(texts, path)`: trains a model whose ids 0..5 are
    PAD, UNK, BOS, EOS, BOI, EOI. `builtin_tokenizer()` does this on the fly from the
    built-in captions (no download), deterministically, cached by content hash.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from typing import Iterable, Sequence

import sentencepiece as spm

from data_pipelines.builtin_text import digit_captions, english_sentences
from data_pipelines.shapes import make_scene
from tfusion.config import ConfigError

BOI_PIECE, EOI_PIECE = "<boi>", "<eoi>"
BUILTIN_VERSION = 1  # bump when the builtin corpus or trainer options change


class TokenizerError(ValueError):
    """A tokenizer model file cannot be used; the message names the file."""


class Tokenizer:
    """Wraps a SentencePieceProcessor; pickles as its model bytes (grain workers)."""

    def __init__(self, model_proto: bytes, pad_id: int = 0):
        self._proto = model_proto
        self._default_pad = pad_id
        self._load()

    def _load(self):
        if not self._proto:  # refused here: sentencepiece loads it and logs errors later
            raise ValueError("empty file, not a sentencepiece model")
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=self._proto)
        except RuntimeError as e:  # sentencepiece's C++ parse and validity checks
            raise ValueError(f"not a sentencepiece model ({str(e).strip()})") from e
        base = self.sp.get_piece_size()
        if base == 0:
            raise ValueError("not a sentencepiece model (no pieces)")
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self._default_pad
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError("sentencepiece model needs BOS and EOS pieces")
        appended = 0
        ids = []
        for piece in (BOI_PIECE, EOI_PIECE):
            found = self.sp.piece_to_id(piece)
            if found != self.sp.unk_id() and self.sp.id_to_piece(found) == piece:
                ids.append(found)
            else:  # absent: append past the vocabulary, as Transfusion does for Llama 2
                ids.append(base + appended)
                appended += 1
        self.boi_id, self.eoi_id = ids
        self.vocab_size = base + appended
        self.special_ids = frozenset((self.pad_id, self.bos_id, self.eos_id,
                                      self.boi_id, self.eoi_id))

    def __getstate__(self):
        return {"proto": self._proto, "pad": self._default_pad}

    def __setstate__(self, state):
        self._proto, self._default_pad = state["proto"], state["pad"]
        self._load()

    @property
    def model_proto(self) -> bytes:
        return self._proto

    def encode(self, text: str) -> list[int]:
        """Text ids only: BOS/EOS/BOI/EOI are placed by the document builder."""
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Decodes text ids; special and appended ids are dropped."""
        base = self.sp.get_piece_size()
        keep = [int(i) for i in ids if i not in self.special_ids and 0 <= i < base]
        return self.sp.decode(keep)


def load_tokenizer(path: str, pad_id: int = 0) -> Tokenizer:
    """The sentencepiece model at `path`; TokenizerError naming it when it is missing,
    unreadable or not a usable sentencepiece model."""
    try:
        with open(path, "rb") as f:
            proto = f.read()
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer model {path!r}: {e.strerror or e}") from e
    try:
        return Tokenizer(proto, pad_id=pad_id)
    except ValueError as e:
        raise TokenizerError(f"{path!r}: {e}") from e


def train_tokenizer_proto(texts: Iterable[str], vocab_size: int) -> bytes:
    """Trains a unigram model (ids 0..5 = PAD UNK BOS EOS BOI EOI); returns its bytes.

    byte_fallback makes any UTF-8 text encodable; one thread and no sentence
    sampling make training deterministic. hard_vocab_limit=False lets a small corpus
    yield fewer pieces than asked instead of failing.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        control_symbols=[BOI_PIECE, EOI_PIECE],
        byte_fallback=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def _atomic_write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # concurrent writers (test workers) race harmlessly


def train_tokenizer(texts: Iterable[str], path: str, vocab_size: int) -> Tokenizer:
    proto = train_tokenizer_proto(texts, vocab_size)
    _atomic_write(path, proto)
    return Tokenizer(proto)


def builtin_corpus() -> list[str]:
    """Captions of the built-in sources plus a little plain English, all generated here."""
    captions = [make_scene(0, i).caption() for i in range(2000)]
    return captions + digit_captions() + english_sentences()


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "tfusion", "tokenizers")


def builtin_tokenizer(vocab_size: int = 512, cache_dir: str = "") -> Tokenizer:
    corpus = builtin_corpus()
    digest = hashlib.sha256("\n".join(corpus).encode()).hexdigest()[:16]
    name = f"builtin-v{BUILTIN_VERSION}-{vocab_size}-{digest}.model"
    path = os.path.join(cache_dir or default_cache_dir(), name)
    if os.path.exists(path):
        return load_tokenizer(path)
    return train_tokenizer(corpus, path, vocab_size)


def build_tokenizer(config) -> Tokenizer:
    """The tokenizer named by config.data.tokenizer ('builtin' or a .model path); a path
    that is no usable model raises ConfigError naming the field and the path."""
    d = config.data
    pad_id = config.model.pad_id if "model" in config else 0
    if d.tokenizer == "builtin":
        return builtin_tokenizer(d.tokenizer_vocab_size, d.tokenizer_cache_dir)
    try:
        return load_tokenizer(d.tokenizer, pad_id=pad_id)
    except TokenizerError as e:
        raise ConfigError("data.tokenizer", f"{e}; expected 'builtin' or a sentencepiece "
                                            ".model file") from e
