"""The `fp8xla` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys


def _progress(msg):
    print(f"  ... {msg}", file=sys.stderr, flush=True)


def demo(args) -> int:
    """Gemma3-270M-shaped decode (M=1) and prefill (M=512) matmuls: XLA float32 vs the
    fake-quant path vs fp8xla's FP8 custom call, same weights, one process."""
    import jax

    import fp8xla
    from fp8xla import matmul_bench

    print(f"fp8xla {fp8xla.__version__} | jax {jax.__version__} | kernels: {fp8xla.isa()} | "
          f"CPU cores: {os.cpu_count()}")
    print("Weights of Gemma3-270M shapes, quantized per channel to float8_e4m3fn (1 byte "
          "each); activations float32, accumulation float32.\n")
    all_rows = []
    for m in args.m:
        print(f"M = {m} ({'decode: one token' if m == 1 else 'prefill: a prompt'})")
        rows = matmul_bench.compare(m, reps=args.reps, progress=_progress)
        print(matmul_bench.table(rows))
        blocks = [r.speedup for r in rows if not r.name.startswith("logits")]
        print(f"geometric-mean speedup over the block shapes: "
              f"{matmul_bench.geomean(blocks):.2f}x\n")
        all_rows += rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(matmul_bench.as_dicts(all_rows), f, indent=2)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fp8xla", description="True FP8 inference on x86 CPUs")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="FP8 vs float32 matmuls at Gemma3-270M shapes")
    d.add_argument("--m", type=int, nargs="+", default=[1, 512], help="rows (tokens)")
    d.add_argument("--reps", type=int, default=5, help="repetitions (median is reported)")
    d.add_argument("--json", help="also write the measurements to this JSON file")
    d.set_defaults(func=demo)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
