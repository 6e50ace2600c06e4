"""An experiment config made into a training run: what the entry point builds and hands
to the library, as big_vision's train.py builds its input pipeline and evaluators
before its loop. tfusion's Trainer never imports data_pipelines; this module joins them.

  validate(config)               the whole config, ConfigError naming the field: the
                                 trainer's parts (tfusion.train.validate), then
                                 config.data (data_pipelines.validate_data_config)
  make_trainer(config, workdir)  validate, then a Trainer given the data pipeline's
                                 train / held-out iterator factories, the tokenizer
                                 (sample grids) and train.final_eval_suite's evaluator
  train(config, workdir)         make_trainer(...).run()

launch/train.py parses flags and calls train(); tests and benchmarks that want the
real input pipeline call these too.
"""
from __future__ import annotations

from data_pipelines.config import validate_data_config
from data_pipelines.pipeline import make_eval_iterator, make_train_iterator
from data_pipelines.tokenizer import build_tokenizer
from tfusion.eval.suites import EvalOptions, suite_evaluator
from tfusion.inference.model_sampler import SamplingSettings
from tfusion.train.loop import FinalEval, Trainer, TrainResult
from tfusion.train.validate import validate_config


def validate(config, num_devices: int | None = None, process_count: int | None = None) -> None:
    """Everything a training run needs, checked before any compilation or data loading.
    The model is checked first: the data checks compare data fields with it."""
    validate_config(config, num_devices, process_count)
    validate_data_config(config)


def final_evaluator(config, workdir: str) -> FinalEval | None:
    """train.final_eval_suite on the trainer's params (sharded on the training mesh;
    every process runs it, the primary writes workdir/eval/); None when the config
    names no suite."""
    suite = config.train.get("final_eval_suite", "")
    if not suite:
        return None
    # One generate() call per 64 prompts: the diffusion loop's per-step cost is mostly
    # fixed overhead at tiny sizes, so wide batches finish sooner.
    options = EvalOptions(progress=False, sampling=SamplingSettings(batch_size=64))
    return suite_evaluator(suite, config, workdir, options=options)


def make_trainer(config, workdir: str, *, devices=None) -> Trainer:
    """A Trainer fed by the configured data pipeline (see the module docstring)."""
    validate(config, None if devices is None else len(devices))
    return Trainer(config, workdir, train_iterator_fn=make_train_iterator,
                   eval_iterator_fn=make_eval_iterator, tokenizer=build_tokenizer(config),
                   final_eval=final_evaluator(config, workdir), devices=devices)


def train(config, workdir: str, *, devices=None) -> TrainResult:
    """Runs (or resumes) training in `workdir` on the configured data."""
    return make_trainer(config, workdir, devices=devices).run()
