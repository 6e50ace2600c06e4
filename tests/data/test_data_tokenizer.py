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
