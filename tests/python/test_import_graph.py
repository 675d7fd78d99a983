"""No import cycle between the modules of the fp8xla package: every module is parsed with
`ast`, imports inside functions included (they make a cycle as much as top-level ones do, only
later), and the graph of fp8xla-to-fp8xla imports must be acyclic."""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import fp8xla


def module_files(package_dir: Path, package: str) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of the package under ``package_dir``."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that module ``name`` imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    found = set()

    def add(target):
        # `from a import b` imports the module a.b if there is one, else a name of module a
        if target in modules:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    add(f"{source}.{alias.name}")
                else:
                    add(source)
    found.discard(name)
    return found


def import_cycles(package_dir: Path, package: str) -> list[list[str]]:
    """Every cycle of the import graph, one per strongly connected component of more than
    one module, as the modules of that component (sorted)."""
    modules = module_files(package_dir, package)
    graph = {m: imports_of(m, p, modules) for m, p in modules.items()}
    # Tarjan's strongly connected components
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(m):
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in sorted(graph[m]):
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            component = []
            while True:
                n = stack.pop()
                on_stack.discard(n)
                component.append(n)
                if n == m:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return cycles


def test_fp8xla_has_no_import_cycle():
    package_dir = Path(fp8xla.__file__).parent
    assert import_cycles(package_dir, "fp8xla") == []


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / "pkg"


def test_a_cycle_through_an_import_inside_a_function_is_found(tmp_path):
    """The shape fp8xla had: `keras` imports `saving` at the top, `saving` imports `keras`
    inside a function (relative and absolute spellings, and a sub-package)."""
    pkg = _write_package(tmp_path, {
        "__init__.py": "from . import ops\n",
        "ops.py": "import os\n",
        "keras/__init__.py": "from .. import saving\nfrom ..saving import load\n",
        "saving.py": """
            import json
            from . import ops

            def load():
                from . import keras as fk
                return fk
        """,
        "tools/__init__.py": "",
        "tools/util.py": """
            def f():
                import pkg.tools.other
        """,
        "tools/other.py": "from pkg.tools import util\n",
    })
    assert import_cycles(pkg, "pkg") == [["pkg.keras", "pkg.saving"],
                                         ["pkg.tools.other", "pkg.tools.util"]]


def test_imports_of_a_sub_package_resolve_to_its_modules(tmp_path):
    pkg = _write_package(tmp_path, {
        "__init__.py": "",
        "a.py": "from .sub import b\nfrom .sub.b import x\n",
        "sub/__init__.py": "",
        "sub/b.py": "from ..a import y\n",
    })
    modules = module_files(pkg, "pkg")
    assert imports_of("pkg.a", modules["pkg.a"], modules) == {"pkg.sub.b"}
    assert imports_of("pkg.sub.b", modules["pkg.sub.b"], modules) == {"pkg.a"}
    assert import_cycles(pkg, "pkg") == [["pkg.a", "pkg.sub.b"]]
