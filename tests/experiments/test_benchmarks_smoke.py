"""The training benchmark runs end to end at a tiny shape and writes the agreed JSON;
the sampler's matmul-floor benchmark counts the FLOPs XLA runs.

One subprocess (the benchmark re-executes itself with its own environment, which a
pytest process with 8 fake devices cannot give it) with 1 warm-up + 1 timed step per
scenario on both sides; the reference side is skipped where its interpreter lacks it.
"""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from tests.helpers import REPO_ROOT
from tfusion.config import ModelConfig, model_config

sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))

import summarize  # noqa: E402
from sampler_matmul_floor import matmul_only_step  # noqa: E402
from train_throughput import REFERENCE_PYTHON, reference_available  # noqa: E402

SCENARIO_KEYS = ("tokens_per_s", "mfu", "peak_flops", "step_s_median", "packing_efficiency")
REFERENCE_KEYS = ("reference_tokens_per_s", "ratio_vs_reference")


@pytest.mark.slow
def test_train_throughput_writes_required_keys(tmp_path):
    out = tmp_path / "train_throughput.json"
    reference = os.path.exists(REFERENCE_PYTHON) and reference_available(REFERENCE_PYTHON)
    cmd = [sys.executable, os.path.join(REPO_ROOT, "benchmarks", "train_throughput.py"),
           "--shape", "tiny", "--warmup", "1", "--steps", "1", "--reference-warmup", "1",
           "--reference-steps", "1", "--peak-n", "256", "--out", str(out)]
    if not reference:
        cmd.append("--no-reference")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("machine", "load_average", "command", "peak_flops"):
        assert key in result
    assert {"cpu_model", "cores", "jax_version"} <= set(result["machine"])
    for scenario in ("fixed", "mix"):
        keys = SCENARIO_KEYS + (REFERENCE_KEYS if reference else ())
        for key in keys:
            assert result[scenario][key] > 0, (scenario, key)
        assert result[scenario]["mfu"] < 1.5  # a broken FLOP count shows up here
    if reference:
        assert "torch_version" in result["machine"]
    # The bare JAX ceiling ran at the fixed shape in the same process.
    assert result["bare_jax"]["seq_len"] == result["fixed"]["seq_len"]
    assert 0 < result["bare_jax"]["mfu_executed"] < 1.5
    assert result["fixed"]["fraction_of_bare_jax"] > 0

    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# t\n{summarize.BEGIN}\nold\n{summarize.END}\ntail\n")
    summarize.update_doc(str(doc), str(tmp_path))
    text = doc.read_text()
    assert "`fixed.tokens_per_s`" in text and "old" not in text and text.endswith("tail\n")
    if not reference:
        pytest.skip("reference venv absent: tfusion side only")


def test_sampler_matmul_floor_counts_the_flops_xla_runs():
    """The matmul-only floor's hand count equals XLA's own FLOP count of the function
    (its dots dominate; the SwiGLU's elementwise work is < 1% at any width here)."""
    cfg = model_config()
    cfg.update(vocab_size=64, width=128, depth=2, num_heads=4, num_kv_heads=2)
    cfg = ModelConfig.of(cfg)
    step, flops = matmul_only_step(cfg, rows=32)
    x = jnp.ones((32, cfg.width), jnp.float32)
    cost = step.lower(x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert flops == pytest.approx(cost["flops"], rel=0.02)
    assert step(x).shape == x.shape
