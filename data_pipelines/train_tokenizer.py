"""Train a sentencepiece tokenizer with the Transfusion special ids.

  python -m data_pipelines.train_tokenizer --output=tok.model --vocab_size=8000 \
      --input='corpus/*.txt'
Without --input, trains on the built-in captions (what data.tokenizer='builtin' does).
Ids 0..5 of the result are PAD, UNK, BOS, EOS, BOI, EOI.
"""
from __future__ import annotations

from absl import app, flags

from data_pipelines.records import BadRecord, clean_text
from data_pipelines.tokenizer import builtin_corpus, train_tokenizer
from data_pipelines.web_sources import text_records

_INPUT = flags.DEFINE_string("input", "", "glob of .txt (a document per line), .jsonl, "
                             ".jsonl.gz or .parquet files")
_TEXT_COLUMN = flags.DEFINE_string("text_column", "text", "JSONL key / parquet column of the text")
_OUTPUT = flags.DEFINE_string("output", None, "path of the .model file to write", required=True)
_VOCAB = flags.DEFINE_integer("vocab_size", 512, "pieces; must exceed 262 (6 specials + 256 byte pieces) + distinct characters")


def corpus_texts(pattern: str, text_column: str):
    records = text_records(pattern, text_column, block=256)  # read in order, block by block
    for i in range(len(records)):
        try:
            yield clean_text(records[i].text, "empty_text")[0]
        except BadRecord:
            continue  # a tokenizer corpus can afford to drop unusable lines


def main(argv):
    del argv
    texts = (corpus_texts(_INPUT.value, _TEXT_COLUMN.value) if _INPUT.value
             else builtin_corpus())
    tok = train_tokenizer(texts, _OUTPUT.value, _VOCAB.value)
    print(f"wrote {_OUTPUT.value}: vocab_size={tok.vocab_size} pad={tok.pad_id} "
          f"bos={tok.bos_id} eos={tok.eos_id} boi={tok.boi_id} eoi={tok.eoi_id}")


if __name__ == "__main__":
    app.run(main)
