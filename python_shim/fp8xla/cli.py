"""The `fp8xla` command line.

    fp8xla demo                                 quantize the default Gemma3 270M and generate
    fp8xla quantize -m MODEL -q OUT -p fp8_e4m3 calibrate, quantize, save an FP8 preset
    fp8xla generate -m PATH "prompt"            generate with a saved (FP8 or float) model
    fp8xla matmuls                              FP8 vs float32 matmuls at Gemma3-270M shapes
    fp8xla bench [--quick] [--contenders ...]   end-to-end benchmark (run from the checkout)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import calibration
from .calibration import CALIBRATION_PROMPTS  # noqa: F401 (the CLI's prompts, importable here)


def _progress(msg):
    print(f"  ... {msg}", file=sys.stderr, flush=True)


def _timed_generate(model, prompt, max_length):
    """Generates twice (the first run compiles) and times the second: (text, new tokens/s)."""
    model.generate(prompt, max_length=max_length)
    t0 = time.perf_counter()
    text = model.generate(prompt, max_length=max_length)
    seconds = time.perf_counter() - t0
    tokenizer = model.preprocessor.tokenizer
    new = len(tokenizer(text)) - len(tokenizer(prompt))
    return text, max(new, 0) / seconds, seconds


def demo(args) -> int:
    """INC's Gemma3 flow on the default model: generate before, calibrate, quantize to FP8,
    generate after; prints both texts and the decode speed of both."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import fp8xla
    from fp8xla import keras as fk
    from fp8xla import models

    print(f"fp8xla {fp8xla.__version__} | {fp8xla._library.banner()} | CPU cores: "
          f"{os.cpu_count()} | XLA_FLAGS={os.environ.get('XLA_FLAGS', '(unset)')}", flush=True)
    model = models.load_model(args.model, progress=True)
    _progress(f"float32 generate (compiles first), max_length={args.max_length}")
    before, tps_before, _ = _timed_generate(model, args.prompt, args.max_length)
    config = fk.StaticQuantConfig(weight_dtype=args.dtype, activation_dtype=args.dtype)

    calib_function = calibration.prompt_calibration(progress=_progress)
    _progress("calibrating and quantizing to FP8")
    t0 = time.perf_counter()
    fk.quantize_model(model, config, calib_function)
    quantize_s = time.perf_counter() - t0
    _progress("FP8 generate (compiles first)")
    after, tps_after, _ = _timed_generate(model, args.prompt, args.max_length)
    fp8_bytes = sum(q.codes.nbytes for q in model.fp8.weights.values())
    print("\n=== float32 (Keras on XLA) ===")
    print(before)
    print(f"--- {tps_before:.1f} tokens/s")
    print(f"\n=== FP8 ({config.weight_dtype} weights and activations, fp8xla) ===")
    print(after)
    print(f"--- {tps_after:.1f} tokens/s ({tps_after / tps_before:.2f}x float32)")
    print(f"\nquantization (calibration + rewrite) took {quantize_s:.1f} s; "
          f"{len(model.fp8.weights)} weights in FP8, {fp8_bytes / 2**20:.0f} MiB "
          f"(float32: {4 * fp8_bytes / 2**20:.0f} MiB)")
    if args.print_model:
        fk.print_model(model)
    return 0


def quantize(args) -> int:
    """Loads MODEL, calibrates on the demo prompts, quantizes and saves an FP8 preset."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    from fp8xla import keras as fk
    from fp8xla import models

    kind = fk.DynamicQuantConfig if args.dynamic else fk.StaticQuantConfig
    config = kind(weight_dtype=args.dtype,
                  activation_dtype=None if args.weight_only else args.dtype,
                  rounding=args.rounding, gptq_act_order=args.act_order,
                  gptq_sequential=args.sequential)
    model = models.load_model(args.model, progress=True)

    _progress("quantizing")
    fk.quantize_model(model, config, calibration.calibration_for(config, progress=_progress))
    _progress(f"saving the FP8 preset to {args.output}")
    model.save_to_preset(args.output)
    print(f"saved {len(model.fp8.weights)} FP8 weights ({config.weight_dtype}, activations "
          f"{config.activation_dtype or 'float32'}) to {args.output}")
    return 0


def generate(args) -> int:
    """Generates with a saved FP8 preset (or any model `fp8xla.models.load_model` takes)."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    from fp8xla import keras as fk
    from fp8xla import models, saving

    if os.path.isdir(args.model) and saving.is_fp8_preset(args.model):
        _progress(f"loading the FP8 preset {args.model}")
        model = fk.load(args.model)
    else:
        model = models.load_model(args.model, progress=True)
    text, tps, seconds = _timed_generate(model, args.prompt, args.max_length)
    print(text)
    print(f"--- {tps:.1f} tokens/s ({'FP8' if getattr(model, 'fp8', None) else 'float32'})",
          file=sys.stderr)
    return 0


def matmuls(args) -> int:
    """Gemma3-270M-shaped decode (M=1) and prefill (M=512) matmuls: XLA float32 vs the
    fake-quant path vs fp8xla's FP8 custom call, same weights, one process."""
    import fp8xla
    from fp8xla import matmul_bench

    print(f"fp8xla {fp8xla.__version__} | {fp8xla._library.banner()} | CPU cores: "
          f"{os.cpu_count()}")
    print(f"  {fp8xla.info()['kernels']}")
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


def find_bench(repo=None):
    """Path of the end-to-end benchmark driver, benches/e2e.py of an fp8xla checkout.

    `fp8xla bench` runs from a checkout of the repository, by design: the end-to-end benchmark
    is repository code (benches/e2e*.py), not part of the installed package. It compares
    fp8xla with other packages (Intel Neural Compressor, Keras int8) in worker processes of
    its own and writes reports like those in benches/results, so it belongs next to them; a
    wheel holds only fp8xla. (`fp8xla matmuls`, the kernel speed check, needs nothing but the
    package and ships in it: fp8xla/matmul_bench.py.) The CLI looks for the checkout in
    ``repo``, or else in the current directory and its parents."""
    from pathlib import Path

    starts = [Path(repo)] if repo else [Path.cwd(), *Path.cwd().parents]
    for root in starts:
        driver = root / "benches" / "e2e.py"
        if driver.is_file() and (root / "python_shim" / "fp8xla").is_dir():
            return driver
    where = f"in {repo}" if repo else f"in {Path.cwd()} or its parents"
    raise FileNotFoundError(
        f"fp8xla bench: the end-to-end benchmark runs from a checkout of the fp8xla repository "
        f"(benches/e2e.py next to python_shim/fp8xla) and is not part of the installed "
        f"package; no checkout found {where}. Run `fp8xla bench` inside a clone of the "
        f"repository, or pass --repo PATH to name one.")


def bench(argv) -> int:
    """Runs benches/e2e.py of the checkout with the remaining arguments as a script of this
    interpreter (so it measures the fp8xla installed here) and returns its exit status."""
    import subprocess

    repo = None
    if "--repo" in argv:
        i = argv.index("--repo")
        if i + 1 >= len(argv):
            print("fp8xla bench: --repo needs a path", file=sys.stderr)
            return 2
        repo, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    try:
        driver = find_bench(repo)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    child = subprocess.Popen([sys.executable, str(driver), *argv])
    while True:
        try:
            code = child.wait()
            break
        except KeyboardInterrupt:
            # Ctrl-C reached the benchmark too (one process group): it ends its workers and
            # exits, and its status is this command's.
            continue
    return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell says


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":  # its options belong to benches/e2e.py
        return bench(argv[1:])
    p = argparse.ArgumentParser(prog="fp8xla", description="True FP8 inference on x86 CPUs")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="quantize the default Gemma3 270M to FP8 and generate")
    d.add_argument("-m", "--model", default="gemma3_270m",
                   help="gemma3_270m (default) or a Keras-Hub Gemma3 preset name or path")
    d.add_argument("--prompt", default="Describe the city of Berlin?")
    d.add_argument("--max-length", type=int, default=64)
    d.add_argument("-p", "--dtype", default="fp8_e4m3", choices=["fp8_e4m3", "fp8_e5m2"])
    d.add_argument("--print-model", action="store_true", help="list per-layer scales")
    d.set_defaults(func=demo)
    q = sub.add_parser("quantize", help="calibrate, quantize to FP8 and save a preset")
    q.add_argument("-m", "--model", default="gemma3_270m")
    q.add_argument("-q", "--output", required=True, help="directory of the FP8 preset")
    q.add_argument("-p", "--dtype", default="fp8_e4m3", choices=["fp8_e4m3", "fp8_e5m2"])
    q.add_argument("--weight-only", action="store_true", help="keep activations float32")
    q.add_argument("--rounding", default="rtn", choices=["rtn", "gptq"],
                   help="round to nearest, or GPTQ on the FP8 grid (docs/quality.md); GPTQ "
                        "calibrates on 19k tokens of Python's own documentation")
    q.add_argument("--act-order", action="store_true",
                   help="with --rounding gptq: round the inputs by decreasing energy")
    q.add_argument("--sequential", action="store_true",
                   help="with --rounding gptq: fit each block to the rounded blocks before it")
    q.add_argument("--dynamic", action="store_true",
                   help="activation scales per token at run time (DynamicQuantConfig)")
    q.set_defaults(func=quantize)
    g = sub.add_parser("generate", help="generate text with a saved model")
    g.add_argument("-m", "--model", required=True, help="FP8 preset directory or model name")
    g.add_argument("prompt")
    g.add_argument("--max-length", type=int, default=64)
    g.set_defaults(func=generate)
    mm = sub.add_parser("matmuls", help="FP8 vs float32 matmuls at Gemma3-270M shapes")
    mm.add_argument("--m", type=int, nargs="+", default=[1, 512], help="rows (tokens)")
    mm.add_argument("--reps", type=int, default=5, help="repetitions (median is reported)")
    mm.add_argument("--json", help="also write the measurements to this JSON file")
    mm.set_defaults(func=matmuls)
    sub.add_parser("bench", add_help=False,
                   help="end-to-end benchmark: float32 Keras, fp8xla FP8, INC FP8, Keras int8, "
                        "llama.cpp (tokens/s, memory, perplexity, share of the memory "
                        "bandwidth); run from the checkout, see "
                        "fp8xla bench --help; --repo PATH names the checkout")
    args = p.parse_args(argv)
    if args.cmd == "quantize" and args.act_order and args.rounding != "gptq":
        q.error("--act-order orders GPTQ's rounding: it needs --rounding gptq")
    if args.cmd == "quantize" and args.sequential and args.rounding != "gptq":
        q.error("--sequential changes where GPTQ's inputs come from: it needs --rounding gptq")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
