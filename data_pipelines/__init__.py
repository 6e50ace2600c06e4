"""tfusion data pipelines: sources, tokenizer, documents, packing (see pipeline.py).

Trainer entry points:
  make_train_iterator(config, *, process_index=0, process_count=1) -> PipelineIterator
  make_eval_iterator(config, *, process_index=0, process_count=1) -> PipelineIterator
  build_tokenizer(config) -> Tokenizer
  pipeline_stats(iterator) -> PipelineStats
  iterator.data_counts() / iterator.skip_examples(): cumulative counts to log, and the
    first skipped record of each reason
  UnusableDataError: raised by next(iterator) when the data cannot do useful work
"""
from data_pipelines.config import data_config, shapes_tiny_data, validate_data_config
from data_pipelines.pipeline import (PipelineIterator, batch_spec, make_eval_iterator,
                                     make_train_iterator)
from data_pipelines.records import UnusableDataError
from data_pipelines.stats import PipelineStats
from data_pipelines.tokenizer import Tokenizer, build_tokenizer


def pipeline_stats(iterator: PipelineIterator) -> PipelineStats:
    """Skipped/repaired counts by reason and packing efficiency of the batches so far."""
    return iterator.stats()


__all__ = ["PipelineIterator", "PipelineStats", "Tokenizer", "UnusableDataError", "batch_spec",
           "build_tokenizer", "data_config", "make_eval_iterator", "make_train_iterator",
           "pipeline_stats", "shapes_tiny_data", "validate_data_config"]
