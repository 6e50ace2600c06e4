"""Tokenizer: trained in the test, round-trips text, keeps the special ids."""
import pickle
import subprocess
import sys

import sentencepiece as spm

from data_pipelines import tokenizer as tk

CORPUS = [f"the {c} {s} number {i} sits at the {p}" for i in range(40)
          for c, s, p in (("red", "circle", "top"), ("blue", "square", "left"),
                          ("green", "triangle", "bottom right"))]


def test_trained_tokenizer_round_trips_and_keeps_special_ids(tmp_path):
    tok = tk.train_tokenizer(CORPUS, str(tmp_path / "t.model"), vocab_size=320)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id) == (0, 2, 3, 4, 5)
    for text in ["the red circle sits at the top", "unseen wörds ünd 漢字 too!", "x"]:
        ids = tok.encode(text)
        assert not set(ids) & tok.special_ids
        assert tok.decode(ids) == text
    # Specials decode to nothing, so a full document decodes to its text.
    ids = [tok.bos_id] + tok.encode("blue square") + [tok.boi_id, tok.eoi_id, tok.eos_id]
    assert tok.decode(ids) == "blue square"
    reloaded = tk.load_tokenizer(str(tmp_path / "t.model"))
    assert reloaded.encode("the blue square") == tok.encode("the blue square")
    assert pickle.loads(pickle.dumps(tok)).encode("green") == tok.encode("green")


def test_foreign_model_gets_boi_eoi_appended_and_pad_from_config(tmp_path):
    # A Llama-2-like model: unk=0, bos=1, eos=2, no pad piece, no BOI/EOI.
    prefix = str(tmp_path / "llama_like")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=prefix,
                                   vocab_size=40, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    tok = tk.load_tokenizer(prefix + ".model", pad_id=0)
    base = spm.SentencePieceProcessor(model_file=prefix + ".model").get_piece_size()
    assert (tok.boi_id, tok.eoi_id, tok.vocab_size) == (base, base + 1, base + 2)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.decode([tok.bos_id, *tok.encode("the red circle"), tok.boi_id]) == "the red circle"


def test_builtin_tokenizer_is_deterministic_and_cached(tmp_path):
    first = tk.builtin_tokenizer(512, str(tmp_path / "a"))
    second = tk.builtin_tokenizer(512, str(tmp_path / "b"))  # trained again from scratch
    assert first.model_proto == second.model_proto
    assert len(list((tmp_path / "a").glob("*.model"))) == 1
    caption = "a small red circle at the top left and a large blue square at the center"
    assert first.decode(first.encode(caption)) == caption
    assert len(first.encode(caption)) < len(caption)  # real pieces, not bytes


def test_cli_trains_a_model(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    out = tmp_path / "cli.model"
    subprocess.run([sys.executable, "-m", "data_pipelines.train_tokenizer", f"--input={corpus}",
                    f"--output={out}", "--vocab_size=320"], check=True, capture_output=True)
    tok = tk.load_tokenizer(str(out))
    assert tok.boi_id == 4 and tok.decode(tok.encode("the green triangle")) == "the green triangle"


def _write_hf_tokenizer(directory, specials: dict, added=("<|begin_of_text|>", "<|end_of_text|>")):
    """A byte-level BPE tokenizer.json trained here (the Llama 3 / Qwen2 kind) and its
    tokenizer_config.json."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(added),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory.mkdir(exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(specials))
    return tok


def test_hf_tokenizer_json_llama3_like(tmp_path):
    hf = _write_hf_tokenizer(tmp_path / "llama3", {
        "bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|end_of_text|>"}})
    tok = tk.load_tokenizer(str(tmp_path / "llama3"), pad_id=0)
    base = hf.get_vocab_size(with_added_tokens=True)
    assert (tok.bos_id, tok.eos_id) == (hf.token_to_id("<|begin_of_text|>"),
                                        hf.token_to_id("<|end_of_text|>"))
    assert (tok.boi_id, tok.eoi_id, tok.vocab_size, tok.pad_id) == (base, base + 1, base + 2, 0)
    for text in ["the red circle sits at the top", "unseen wörds ünd 漢字 too!"]:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids
        assert tok.decode([tok.bos_id, *ids, tok.boi_id, tok.eoi_id, tok.eos_id]) == text
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode("green") == tok.encode("green") and again.boi_id == tok.boi_id
    # The file itself works like its directory.
    assert tk.load_tokenizer(str(tmp_path / "llama3" / "tokenizer.json")).eoi_id == base + 1


def test_hf_tokenizer_json_without_bos_and_bad_specials(tmp_path):
    import pytest

    from experiments.base import base_config
    from tfusion.config import ConfigError

    hf = _write_hf_tokenizer(tmp_path / "qwen", {"bos_token": None,
                                                 "eos_token": "<|end_of_text|>",
                                                 "pad_token": "<|begin_of_text|>"})
    tok = tk.load_tokenizer(str(tmp_path / "qwen"))
    eos = hf.token_to_id("<|end_of_text|>")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (eos, eos, hf.token_to_id("<|begin_of_text|>"))
    _write_hf_tokenizer(tmp_path / "bad", {"eos_token": "<|not_there|>"})
    with pytest.raises(tk.TokenizerError, match="not a token"):
        tk.load_tokenizer(str(tmp_path / "bad"))
    config = base_config()
    config.data.tokenizer = str(tmp_path / "bad" / "tokenizer.json")
    with pytest.raises(ConfigError, match="data.tokenizer"):
        tk.build_tokenizer(config)
