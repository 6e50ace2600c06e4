"""Tokenizers with the Transfusion special ids (PAD/BOS/EOS/BOI/EOI).

Three ways in:
  * `load_tokenizer(path)`: any existing sentencepiece `.model` (e.g. Llama 2's).
    Missing BOI/EOI pieces get ids appended past its vocabulary (Llama 2: 32000,
    32001); a model without a pad piece (Llama 2) uses `pad_id` (default 0 =
    config.model.pad_id).
  * `load_tokenizer(path)` of a Hugging Face `tokenizer.json` (or a directory holding
    one; Llama 3, Qwen2, most current models): read with the `tokenizers` library, its
    BOS / EOS / PAD from the `tokenizer_config.json` beside it (JsonTokenizer); BOI/EOI
    appended past its vocabulary (added tokens included) unless it has `<boi>`/`<eoi>`.
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
        self.base_vocab_size = base  # ids of the model itself (BOI/EOI appended after)
        self.bos_from_eos = False
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


class JsonTokenizer:
    """A Hugging Face tokenizer.json through the `tokenizers` library, with the same
    interface as Tokenizer; pickles as its JSON text and special-token names.

    BOS, EOS and PAD are the tokenizer_config.json's `bos_token`, `eos_token` and
    `pad_token` (a string, or a dict with "content"). A tokenizer with no BOS (Qwen2)
    starts documents with its EOS, the separator its documents were trained with; one
    with no PAD uses `pad_id` (pad positions are never attended or trained)."""

    def __init__(self, tokenizer_json: str, special: dict, pad_id: int = 0):
        self._json, self._special, self._default_pad = tokenizer_json, dict(special), pad_id
        self._load()

    def _load(self):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tok = HFTokenizer.from_str(self._json)
        except Exception as e:  # the Rust parser raises its own exception type
            raise ValueError(f"not a tokenizer.json ({str(e).strip()[:200]})") from e
        base = self.tok.get_vocab_size(with_added_tokens=True)

        def id_of(name):
            token = self._special.get(name)
            if isinstance(token, dict):
                token = token.get("content")
            if not token:
                return None
            found = self.tok.token_to_id(token)
            if found is None:
                raise ValueError(f"its {name} {token!r} is not a token of the vocabulary")
            return found

        self.eos_id = id_of("eos_token")
        if self.eos_id is None:
            raise ValueError("no eos_token in tokenizer_config.json (documents need an end)")
        bos = id_of("bos_token")
        self.bos_from_eos = bos is None
        self.bos_id = self.eos_id if bos is None else bos
        pad = id_of("pad_token")
        self.pad_id = self._default_pad if pad is None else pad
        ids, appended = [], 0
        for piece in (BOI_PIECE, EOI_PIECE):
            found = self.tok.token_to_id(piece)
            ids.append(base + appended if found is None else found)
            appended += found is None
        self.boi_id, self.eoi_id = ids
        self.vocab_size = base + appended
        self.base_vocab_size = base  # ids of tokenizer.json, added tokens included
        self.special_ids = frozenset((self.pad_id, self.bos_id, self.eos_id,
                                      self.boi_id, self.eoi_id))

    def __getstate__(self):
        return {"json": self._json, "special": self._special, "pad": self._default_pad}

    def __setstate__(self, state):
        self._json, self._special, self._default_pad = (state["json"], state["special"],
                                                        state["pad"])
        self._load()

    def encode(self, text: str) -> list[int]:
        """Text ids only (no template specials): BOS/EOS/BOI/EOI are placed by the
        document builder."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Decodes text ids; special and appended ids are dropped."""
        keep = [int(i) for i in ids if i not in self.special_ids and 0 <= i < self.base_vocab_size]
        return self.tok.decode(keep, skip_special_tokens=False)


def _load_json_tokenizer(path: str, pad_id: int) -> JsonTokenizer:
    """tokenizer.json at `path` (a file, or a directory holding it) with the
    tokenizer_config.json beside it."""
    import json

    directory = path if os.path.isdir(path) else os.path.dirname(path)
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer {file!r}: {e.strerror or e}") from e
    special = {}
    config_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as f:
            special = {k: v for k, v in json.load(f).items()
                       if k in ("bos_token", "eos_token", "pad_token")}
    try:
        return JsonTokenizer(text, special, pad_id=pad_id)
    except ValueError as e:
        raise TokenizerError(f"{file!r}: {e}") from e


def is_json_tokenizer(path: str) -> bool:
    return path.endswith(".json") or os.path.isfile(os.path.join(path, "tokenizer.json"))


def load_tokenizer(path: str, pad_id: int = 0):
    """The tokenizer at `path`: a sentencepiece `.model`, or a Hugging Face
    `tokenizer.json` (or a directory with one); TokenizerError naming it when it is
    missing, unreadable or not usable."""
    if is_json_tokenizer(path):
        return _load_json_tokenizer(path, pad_id)
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


def builtin_tokenizer_path(vocab_size: int = 512, cache_dir: str = "") -> str:
    """Where the built-in tokenizer of this size is cached (trained there if missing)."""
    corpus = builtin_corpus()
    digest = hashlib.sha256("\n".join(corpus).encode()).hexdigest()[:16]
    name = f"builtin-v{BUILTIN_VERSION}-{vocab_size}-{digest}.model"
    path = os.path.join(cache_dir or default_cache_dir(), name)
    if not os.path.exists(path):
        train_tokenizer(corpus, path, vocab_size)
    return path


def builtin_tokenizer(vocab_size: int = 512, cache_dir: str = "") -> Tokenizer:
    return load_tokenizer(builtin_tokenizer_path(vocab_size, cache_dir))


def build_tokenizer(config):
    """The tokenizer named by config.data.tokenizer ('builtin', a .model path or a
    tokenizer.json / a directory with one); a path
    that is no usable model raises ConfigError naming the field and the path."""
    d = config.data
    pad_id = config.model.pad_id if "model" in config else 0
    if d.tokenizer == "builtin":
        return builtin_tokenizer(d.tokenizer_vocab_size, d.tokenizer_cache_dir)
    try:
        return load_tokenizer(d.tokenizer, pad_id=pad_id)
    except TokenizerError as e:
        raise ConfigError("data.tokenizer", f"{e}; expected 'builtin', a sentencepiece "
                                            ".model file or a tokenizer.json") from e
