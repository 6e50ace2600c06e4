"""Shared test helpers; tests import from here, never from each other.

packed_batches: tiny model configs and random packed batches; train_fixtures: tiny
training configs and runs; data_fixtures: shapes/digits data on disk; inference_helpers:
engines and prompts; numpy_reference: the independent numpy references (loss, mask).
"""
import os

# The repository root (tests/helpers/ -> tests/ -> root), for subprocess commands and
# committed files.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
