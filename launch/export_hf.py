"""A run's text model as a Hugging Face checkpoint (`AutoModelForCausalLM` loads it,
lm-eval-harness runs on it); the image layers saved beside it.

  python -m launch.export_hf --workdir=WD --out=DIR [--params=ema|raw] [--step=N]

DIR gets config.json (LlamaForCausalLM, or Qwen2ForCausalLM where the run has q/k/v
biases), model.safetensors (float32, streamed: one tfusion param on the host at a
time, its layers written together), the run's tokenizer files, and the image side:
image_layers.safetensors (tfusion's flat names: image_encoder.*, image_decoder.* and
untied image twins) with tfusion_config.json (the run's config). The vocab rows written are those of the
Hugging Face checkpoint the run was imported from (hf_import.json; its BOI/EOI rows
are tfusion's), else all of model.vocab_size (BOI/EOI included). See tfusion/hf.py
for the tensor mapping. An unreadable run or an OUT that is not empty exits with one
`error: ...` line.
"""
from __future__ import annotations

import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config.json, checkpoints/).",
                               required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory (new or empty).", required=True)
_PARAMS = flags.DEFINE_enum("params", "ema", ["ema", "raw"],
                            "ema: the run's EMA of the parameters (raw where it kept none).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the newest.")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from tfusion.config import ConfigError
    from tfusion.eval.checkpoints import RunNotFoundError
    from tfusion.hf import HFCheckpointError

    from tfusion.eval.hf_checkpoints import export_hf

    try:
        info = export_hf(_WORKDIR.value, _OUT.value, _PARAMS.value, _STEP.value)
    except (RunNotFoundError, ConfigError, HFCheckpointError) as e:
        sys.exit(f"error: {e}")
    print(f"exported step {info['step']} ({info['params']}) of {_WORKDIR.value} to {info['out']}: "
          f"{info['tensors']} tensors, vocab {info['hf_vocab_size']}")


if __name__ == "__main__":
    app.run(main)
