"""Each sharded web source, and a mixture of them, trains through the CLI on shards
these tests write (real PNG/JPEG bytes, faults at known places), and the counts the
run logs are exactly those of the pipeline reading the same number of batches."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO_ROOT, web_shards
from tests.helpers.train_fixtures import TINY_CLI_OVERRIDES

STEPS = 6
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("web_train")
    for name in ("wds", "parquet", "interleaved", "text"):
        (root / name).mkdir()
    web_shards.write_webdataset(root / "wds")
    web_shards.write_truncated_tar(root / "wds" / "00003.tar")
    web_shards.write_parquet(root / "parquet")
    web_shards.write_interleaved(root / "interleaved")
    web_shards.write_text_shards(root / "text")
    return root


def _flags(kind: str, root) -> list[str]:
    common = ["--config.data.shuffle_block=4", "--config.data.eval_examples=2"]
    if kind == "mixture":
        entries = [{"name": "web", "source": "webdataset", "data_dir": f"{root}/wds/*.tar",
                    "weight": 0.3},
                   {"name": "hf", "source": "parquet", "data_dir": f"{root}/parquet/*",
                    "weight": 0.2},
                   {"name": "docs", "source": "interleaved",
                    "data_dir": f"{root}/interleaved/*", "weight": 0.2},
                   {"name": "corpus", "source": "text", "data_dir": f"{root}/text/*",
                    "weight": 0.3}]
        return common + [f"--config.data.mixture={json.dumps(entries)}"]
    directory = {"webdataset": "wds/*.tar", "parquet": "parquet/*.parquet",
                 "interleaved": "interleaved/*"}[kind]
    text = ["--config.data.text_source=none"] if kind == "interleaved" else []
    return common + text + [f"--config.data.source={kind}",
                            f"--config.data.data_dir={root}/{directory}"]


def _config(flags):
    """The CLI's config, the flags applied as ml_collections does."""
    from experiments.registry import get_config

    c = get_config("shapes_tiny")
    for flag in flags:
        key, value = flag[len("--config."):].split("=", 1)
        section, field = key.split(".")
        c[section][field] = type(c[section][field])(value)
    return c


@pytest.mark.parametrize("kind", ["webdataset", "parquet", "interleaved", "mixture"])
def test_source_trains_through_the_cli_with_exact_counts(data, tmp_path, kind):
    from data_pipelines import make_train_iterator

    flags = [*TINY_CLI_OVERRIDES, *_flags(kind, data), f"--config.train.steps={STEPS}",
             "--config.train.log_every=1", "--config.train.sample_every=0"]
    proc = subprocess.run([sys.executable, "-m", "launch.train",
                           "--config=experiments/registry.py:shapes_tiny",
                           f"--workdir={tmp_path}", *flags],
                          cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if json.loads(line)["split"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["loss"]) for r in rows)
    logged = {k: v for k, v in rows[-1].items() if k.startswith("data_")}
    it = make_train_iterator(_config(flags))
    for _ in range(STEPS):
        next(it)
    assert logged == it.data_counts()
    assert logged["data_records_read"] > 0 and any(k.startswith("data_skipped_") for k in logged)
    assert "per source:" in proc.stderr
