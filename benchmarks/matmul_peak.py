"""This machine's float32 matmul peak (FLOP/s), the denominator of CPU MFU.

    python benchmarks/matmul_peak.py [--n 2048] [--repeats 10]

The measurement itself is tfusion.train.mfu.measure_matmul_flops (best of `repeats`
timed n x n x n matmuls after a compile), the same one training runs use; this
wrapper only picks a size big enough to reach the BLAS kernel's steady state.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PEAK_MATMUL_SIZE = 2048  # 17 GFLOP per call: well past cache effects, ~0.1 s on 2 cores


def measure_peak_flops(n: int = PEAK_MATMUL_SIZE, repeats: int = 10) -> float:
    from tfusion.train.mfu import measure_matmul_flops
    return measure_matmul_flops(n=n, repeats=repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=PEAK_MATMUL_SIZE)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    flops = measure_peak_flops(args.n, args.repeats)
    print(json.dumps({"matmul_size": args.n, "peak_flops": flops,
                      "peak_gflops": round(flops / 1e9, 1)}))


if __name__ == "__main__":
    main()
