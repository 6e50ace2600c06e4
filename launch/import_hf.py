"""A Hugging Face Llama-family checkpoint becomes a tfusion run directory.

  python -m launch.import_hf --hf_dir=DIR --workdir=WD [--config=experiments/registry.py:NAME]

DIR holds config.json, model.safetensors (or shards with model.safetensors.index.json)
and a tokenizer (tokenizer.json + tokenizer_config.json, or a sentencepiece
tokenizer.model). WD gets: config.json (the experiment NAME, default shapes_tiny, with
its text backbone replaced by the checkpoint's: width, depth, heads, GQA, MLP size,
RoPE theta and scaling, norm eps, tied embeddings, Qwen2's q/k/v biases; vocab_size
covering the checkpoint's rows and the tokenizer's ids with BOI/EOI appended),
tokenizer/ (a copy, which config.data.tokenizer names), checkpoints/0/state =
{"params": ...} (params only: the text weights converted, the new BOI/EOI rows at the
mean row, the image layers freshly initialised), export.json and hf_import.json. WD
is then what `launch.generate`, `launch.evaluate` and `train.init_from` read.

Tensors are read one at a time (safetensors headers first, then seek + read) and each
tfusion param is placed in its sharding on the mesh as soon as it is built: host
memory holds about one param (stacked over layers), never the model. Everything is
checked before anything is written (model_type, activation, biases, RoPE scaling,
every tensor's presence and shape, the tokenizer's ids against the config), and the
run directory is written under a temporary name and renamed at the end: a refusal or
a crash leaves no WD. Refusals print one `error: ...` line.
"""
from __future__ import annotations

import sys

from absl import app, flags

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face checkpoint directory.",
                              required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory to create.", required=True)
_CONFIG = flags.DEFINE_string("config", "experiments/registry.py:shapes_tiny",
                              "Experiment whose image side and training setup the run takes.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the image layers' initialisation.")

def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from tfusion.config import ConfigError
    from tfusion.hf import HFCheckpointError
    from data_pipelines.tokenizer import TokenizerError
    from tfusion.autoencoders.safetensors_io import SafetensorsError

    from experiments import registry
    from tfusion.eval.hf_checkpoints import import_hf

    try:
        base = registry.get_config(_CONFIG.value.split(":")[-1])
        record = import_hf(_HF_DIR.value, _WORKDIR.value, base, _SEED.value)
    except (HFCheckpointError, ConfigError, TokenizerError, SafetensorsError, KeyError) as e:
        sys.exit(f"error: {e}")
    print(f"imported {record['model_type']} from {record['source']} into {_WORKDIR.value}: "
          f"{record['params']} tensors, vocab {record['hf_vocab_size']} -> "
          f"{record['vocab_size']} (BOI/EOI)")


if __name__ == "__main__":
    app.run(main)
