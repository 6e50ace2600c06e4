#!/usr/bin/env bash
# Runs every benchmark present in benchmarks/ with its defaults, then gathers the
# results into docs/benchmarks.md. Run on a quiet machine: the figures are timings.
#
#   bash benchmarks/run_all.sh            # PYTHON=/path/to/python to override
#
# Each script writes its own benchmarks/results/<name>.json. A benchmark that fails
# is reported and the others still run; the exit status is non-zero if any failed.
set -u
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Benchmarks never use the tests' 8 fake devices (they split the cores, ~7% slower).
unset XLA_FLAGS

failed=()
# quality_vs_reference trains both systems for 10 min each (~23 min in all, ~2 GB of
# checkpoints in a temp dir it deletes).
for name in data_pipeline data_sources image_capacity untied_weights inference sampler_matmul_floor block_sparsity autoencoders train_throughput step_breakdown train_loop attention_xla \
        quality_vs_reference; do
    script="benchmarks/$name.py"
    [ -f "$script" ] || { echo "== $name: not present, skipped"; continue; }
    echo "== $name  (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
    start=$SECONDS
    if "$PYTHON" -m "benchmarks.$name"; then
        echo "== $name done in $((SECONDS - start)) s"
    else
        echo "== $name FAILED"
        failed+=("$name")
    fi
done
"$PYTHON" benchmarks/summarize.py
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}"
    exit 1
fi
