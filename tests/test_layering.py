"""Imports inside dpo_cluster run downhill only, and no two modules import each other.

Every module's imports (lazy ones inside functions included) are read with `ast`; each module
belongs to the layer of its top-level name in `LAYERS` (the order of `dpo_cluster/__init__.py`'s
docstring), and may import its own layer or lower ones. The checker is run on a small synthetic
tree too, so an uphill import is shown to fail it.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "dpo_cluster"

# Lowest first. A module's layer is that of its first name under dpo_cluster ("data" for
# dpo_cluster.data.pipeline); "" is the package's own __init__ (the version).
LAYERS: list[tuple[str, ...]] = [
    ("", "losses", "logprobs", "stats", "paths", "plots", "ray_session"),
    ("config",),
    ("modeling", "tiny", "mlp_recompute", "gguf_models"),
    ("data",),
    ("batch",),
    ("reference",),
    ("train",),
    ("evaluation", "serving"),
    ("bench", "demo", "rounds"),
    ("cli",),
]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path) -> set[str]:
    """Every dpo_cluster module `path` imports, at module level or inside functions."""
    package = root.name
    name = module_name(path, root)
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == package)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != package:
                continue
            found.add(target)
            # `from pkg import sub` imports the submodule pkg.sub when there is one.
            for alias in node.names:
                candidate = root.parent.joinpath(*target.split("."), alias.name)
                if candidate.with_suffix(".py").exists() or (candidate / "__init__.py").exists():
                    found.add(f"{target}.{alias.name}")
    found.discard(name)
    return found


def layer_of(module: str, layers: list[tuple[str, ...]]) -> int:
    top = module.split(".")[1] if "." in module else ""
    for index, names in enumerate(layers):
        if top in names:
            return index
    raise AssertionError(f"{module}: its name {top!r} is in no layer; add it to LAYERS")


def import_graph(root: Path) -> dict[str, set[str]]:
    return {module_name(p, root): imported_modules(p, root) for p in sorted(root.rglob("*.py"))}


def uphill_imports(root: Path, layers: list[tuple[str, ...]]) -> list[str]:
    problems = []
    for module, imports in import_graph(root).items():
        for target in sorted(imports):
            if layer_of(target, layers) > layer_of(module, layers):
                problems.append(f"{module} imports {target}, a higher layer")
    return problems


def import_cycles(root: Path) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted.

    A package's __init__ re-exporting its own submodules is not a cycle unless a submodule
    imports the package back."""
    graph = import_graph(root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return cycles


def test_every_import_runs_downhill() -> None:
    assert uphill_imports(PACKAGE_DIR, LAYERS) == []


def test_no_import_cycles() -> None:
    assert import_cycles(PACKAGE_DIR) == []


def test_the_package_docstring_lists_the_layers() -> None:
    import dpo_cluster

    doc = dpo_cluster.__doc__ or ""
    for names in LAYERS:
        for name in names:
            if name:
                assert name in doc, f"dpo_cluster/__init__.py's docstring does not place {name!r}"


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@pytest.mark.parametrize(
    ("importer", "statement"),
    [
        ("config/__init__.py", "from dpo_cluster.data.pipeline import prepare\n"),
        ("config/__init__.py", "def f():\n    from dpo_cluster.data import pipeline\n"),
        ("data/pipeline.py", "from ..train import loop\n"),
        ("losses.py", "import dpo_cluster.train.loop\n"),
    ],
)
def test_an_uphill_import_fails_the_check(tmp_path: Path, importer: str, statement: str) -> None:
    root = tmp_path / "dpo_cluster"
    _write(
        root,
        {
            "__init__.py": "",
            "losses.py": "",
            "config/__init__.py": "",
            "data/__init__.py": "",
            "data/pipeline.py": "from dpo_cluster.config import x\n",
            "train/__init__.py": "",
            "train/loop.py": "from dpo_cluster.data.pipeline import prepare\n",
        },
    )
    assert uphill_imports(root, LAYERS) == []
    (root / importer).write_text((root / importer).read_text() + statement)
    problems = uphill_imports(root, LAYERS)
    assert problems and all(p.startswith(module_name(root / importer, root) + " ") for p in problems)


def test_a_cycle_fails_the_check(tmp_path: Path) -> None:
    root = tmp_path / "dpo_cluster"
    _write(
        root,
        {
            "__init__.py": "",
            "bench/__init__.py": "",
            "bench/train.py": "def f():\n    from dpo_cluster.bench.train_report import g\n",
            "bench/train_report.py": "",
        },
    )
    assert import_cycles(root) == []
    (root / "bench/train_report.py").write_text("from dpo_cluster.bench import train\n")
    assert import_cycles(root) == [["dpo_cluster.bench.train", "dpo_cluster.bench.train_report"]]
