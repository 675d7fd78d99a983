"""Packaging: the sdist built from the repository root holds the Rust crate and the Python
package (and no build outputs), the pins of pyproject.toml agree with constraints.txt, and
what the installed package promises works away from a checkout: `fp8xla matmuls` runs, and
`fp8xla bench` says that it runs from a checkout."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHIM = REPO / "python_shim"

#: Everything the build compiles: cargo's manifest, lock file and build script, the crate's
#: sources and header, and the bench targets that Cargo.toml declares.
CRATE_FILES = ["Cargo.toml", "Cargo.lock", "build.rs"]
CRATE_DIRS = ["src", "xla_ffi", "include"]


def _checkout_files(root, pattern="*"):
    return {p.relative_to(REPO).as_posix() for p in (REPO / root).rglob(pattern)
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".so"}


def _is_build_output(name):
    parts = name.split("/")
    return (parts[0] in ("target", "build", "dist", ".venv") or "__pycache__" in parts
            or name.endswith((".so", ".pyc", ".whl", ".tar.gz")))


#: Build outputs a developer's checkout holds (an in-place build of the library, Python's
#: caches, setuptools' build directory): planted in the copy that the sdist is built from.
PLANTED_OUTPUTS = ["python_shim/fp8xla/_native.cpython-311-x86_64-linux-gnu.so",
                   "python_shim/fp8xla/__pycache__/cli.cpython-311.pyc",
                   "build/lib/fp8xla/cli.py", "target/release/libfp8xla.so"]


@pytest.fixture(scope="module")
def sdist_names(tmp_path_factory):
    """The files of an sdist built with setuptools' PEP 517 hook (what pip and `python -m build
    --sdist` call), relative to its top directory. It is built from a copy of the checkout
    without the Rust build and the venv (too big to copy) and without setuptools' egg-info,
    whose file list from an earlier build setuptools would reuse, hiding what MANIFEST.in
    leaves out; with build outputs planted instead."""
    import shutil

    tree = tmp_path_factory.mktemp("checkout") / "fp8xla"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(
        "target", ".venv", ".git", "*.egg-info", ".pytest_cache"))
    for name in PLANTED_OUTPUTS:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(b"\0")
    out = tmp_path_factory.mktemp("sdist")
    run = subprocess.run(
        [sys.executable, "-c",
         "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))",
         str(out)],
        cwd=tree, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    archive = out / run.stdout.strip().splitlines()[-1]
    with tarfile.open(archive) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    top = {n.split("/", 1)[0] for n in names}
    assert top == {"fp8xla-0.1.0"}, top
    return {n.split("/", 1)[1] for n in names}


def test_sdist_holds_the_crate(sdist_names):
    crate = set(CRATE_FILES) | _checkout_files("benches", "*.rs")
    for d in CRATE_DIRS:
        crate |= _checkout_files(d)
    assert "src/lib.rs" in crate and "xla_ffi/exports.rs" in crate  # the walk found the crate
    assert crate - sdist_names == set()


def test_sdist_holds_the_python_package(sdist_names):
    package = _checkout_files("python_shim/fp8xla", "*.py")
    assert "python_shim/fp8xla/__init__.py" in package
    assert package - sdist_names == set()
    assert "pyproject.toml" in sdist_names


def test_sdist_holds_no_build_outputs_nor_the_benchmark(sdist_names):
    assert sorted(n for n in sdist_names if _is_build_output(n)) == []
    # The end-to-end benchmark and the tests stay in the repository.
    assert sorted(n for n in sdist_names if n.startswith(("tests/", "benches/results/"))
                  or (n.startswith("benches/") and n.endswith(".py"))) == []


# ---------------------------------------------------------------------------------------------
# pins


def _constraints():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (SHIM / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def _requirement_names(path):
    from packaging.utils import canonicalize_name

    return {canonicalize_name(line.split("#", 1)[0].strip())
            for line in path.read_text().splitlines() if line.split("#", 1)[0].strip()}


def test_every_requirement_is_pinned_in_constraints_and_agrees():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = _constraints()
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = meta["project"]
    declared = [*meta["build-system"]["requires"], *project["dependencies"]]
    for extra in ("keras", "inc", "llama", "bench", "test"):
        declared += project["optional-dependencies"][extra]
    wrong = []
    for text in declared:
        req = Requirement(text)
        pin = pins.get(canonicalize_name(req.name))
        if pin is None or not req.specifier.contains(pin, prereleases=True):
            wrong.append(f"{text} (constraints.txt: {pin})")
    assert wrong == []
    for path in SHIM.glob("requirements*.txt"):
        assert sorted(_requirement_names(path) - set(pins)) == [], path.name


def test_extras_say_what_the_requirement_files_say():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]

    def names(extra):
        return {canonicalize_name(Requirement(r).name) for r in extras[extra]}

    assert names("inc") == _requirement_names(SHIM / "requirements-inc.txt")
    assert names("llama") == _requirement_names(SHIM / "requirements-llama.txt")
    # What pip would install only with TensorFlow is not in the keras extra (it is installed
    # with --no-deps), and everything else the venv's Keras path gets is.
    nodeps = _requirement_names(SHIM / "requirements-nodeps.txt")
    assert nodeps == {"keras-hub", "tokenizers"}
    assert names("keras") & nodeps == set()
    assert names("keras") <= _requirement_names(SHIM / "requirements.txt")


# ---------------------------------------------------------------------------------------------
# the installed package away from a checkout


def test_bench_outside_a_checkout_says_it_runs_from_one(tmp_path):
    for extra in ([], ["--repo", str(tmp_path)]):
        run = subprocess.run([sys.executable, "-m", "fp8xla.cli", "bench", *extra, "--quick"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, run.stderr
        assert "Traceback" not in run.stderr
        err = " ".join(run.stderr.split())
        assert "runs from a checkout of the fp8xla repository" in err
        assert f"no checkout found in {tmp_path}" in err
        assert "Run `fp8xla bench` inside a clone of the repository, or pass --repo PATH" in err


def test_bench_runs_the_checkouts_driver_named_by_repo(tmp_path):
    # Its --help only: the benchmark itself takes half an hour (test_bench_e2e runs a quick one).
    run = subprocess.run([sys.executable, "-m", "fp8xla.cli", "bench", "--repo", str(REPO),
                          "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "usage: fp8xla bench" in run.stdout and "--contenders" in run.stdout


def test_matmuls_runs_from_the_installed_package(tmp_path):
    # `fp8xla matmuls` in a fresh process away from the checkout, on two small shapes (one of
    # each weight layout, one weight copy each) instead of Gemma3-270M's: what it needs must
    # all be in the package. No time is checked, only that every measurement is there and the
    # FP8 custom call agrees with the fake-quant dot.
    script = textwrap.dedent("""
        import functools, sys
        from fp8xla import cli, matmul_bench
        matmul_bench.DISTINCT_BYTES = 0
        matmul_bench.compare = functools.partial(
            matmul_bench.compare, min_seconds=0.0,
            shapes=[("small kn", 64, 48, "kn"), ("small nk", 96, 32, "nk")])
        sys.exit(cli.main(["matmuls", "--m", "1", "3", "--reps", "1", "--json", "rows.json"]))
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("geometric-mean speedup") == 2
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["name"], r["m"], r["k"], r["n"]) for r in rows] == [
        ("small kn", 1, 64, 48), ("small nk", 1, 96, 32),
        ("small kn", 3, 64, 48), ("small nk", 3, 96, 32)]
    for r in rows:
        assert r["f32_ms"] > 0 and r["fp8_ms"] > 0 and r["fake_quant_ms"] > 0
        assert r["max_rel_err_vs_fake_quant"] < 1e-5
