"""The package's shape: every module imports alone, no import cycle, a pure core.

Each ``gateway`` module is imported by itself in a fresh ``python -c`` process, so none
depends on another having been imported first. The import graph is read from the
source (module-level imports, ``if TYPE_CHECKING:`` ones included, since a type-only
cycle is still two modules that cannot be read apart) and must have no cycle. The pure
core (``adapters/``, ``sse.py``, ``exchange.py``, ``ending.py``, ``pricing.py``,
``http11.py``) loads none of the I/O libraries, and no protocol package imports another.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import gevent.pool

from tests.servers import ROOT

PACKAGE = ROOT / "gateway"
PURE = (
    "gateway.adapters",
    "gateway.sse",
    "gateway.exchange",
    "gateway.ending",
    "gateway.pricing",
    "gateway.http11",
)
IO_LIBRARIES = ("requests", "urllib3", "peewee", "redis", "gevent", "psycopg", "psycopg2")
PROTOCOLS = ("openai_chat", "anthropic", "openai_responses")


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_of(name: str, path: Path) -> set[str]:
    """The gateway modules ``name`` imports at module level (type-only imports too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    known = modules()
    found: set[str] = set()
    for node in _module_level(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # ``from pkg import mod`` imports the module pkg.mod when there is one.
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _module_level(tree: ast.Module) -> list[ast.stmt]:
    statements: list[ast.stmt] = []
    for node in tree.body:
        statements.append(node)
        if isinstance(node, ast.If | ast.Try):  # if TYPE_CHECKING:, try/except ImportError
            statements.extend(_module_level(ast.Module(body=node.body, type_ignores=[])))
    return statements


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle in ``graph`` (as the path that closes it), or None."""
    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> list[str] | None:
        if name in visiting:
            return [*visiting[visiting.index(name) :], name]
        if name in done:
            return None
        visiting.append(name)
        for target in sorted(graph.get(name, ())):
            found = visit(target)
            if found:
                return found
        visiting.pop()
        done.add(name)
        return None

    return next((c for name in sorted(graph) if (c := visit(name))), None)


def test_the_import_graph_has_no_cycle() -> None:
    graph = {name: imports_of(name, path) for name, path in modules().items()}
    # A module's own package __init__ runs first: not a cycle of their own making.
    graph = {n: {t for t in ts if not n.startswith(t + ".")} for n, ts in graph.items()}
    assert len(graph) > 40 and sum(map(len, graph.values())) > 100
    assert cycle(graph) is None, " -> ".join(cycle(graph) or [])


def test_the_check_finds_cycles_and_reads_every_kind_of_import() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
    graph = {name: imports_of(name, path) for name, path in modules().items()}
    assert "gateway.call" in graph["gateway.calls"]  # absolute
    assert "gateway.adapters.ir" in graph["gateway.adapters.openai_chat.response"]  # from .. import
    assert "gateway.adapters.openai_chat.response" in graph["gateway.adapters.openai_chat.stream"]
    assert "gateway.adapters.translator" in graph["gateway.downstream"]  # under TYPE_CHECKING
    assert "gateway.calls" not in graph["gateway.call"]


def test_no_protocol_imports_another() -> None:
    for name, path in modules().items():
        own = next((p for p in PROTOCOLS if f".adapters.{p}" in name), None)
        if own is None:
            continue
        others = {t for t in imports_of(name, path) for p in PROTOCOLS if p != own and f".{p}" in t}
        assert not others, f"{name} imports {others}"


def _import_alone(name: str) -> tuple[str, int, str]:
    check = f"import sys, {name}; print(','.join(m for m in {IO_LIBRARIES!r} if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    return name, done.returncode, done.stdout.strip() if done.returncode == 0 else done.stderr


def test_every_module_imports_alone_in_a_fresh_process() -> None:
    results = gevent.pool.Pool(4).map(_import_alone, sorted(modules()))
    failed = {name: out for name, code, out in results if code}
    assert not failed, failed
    impure = {
        name: loaded
        for name, _, loaded in results
        if loaded and any(name == p or name.startswith(p + ".") for p in PURE)
    }
    assert not impure, f"pure modules that load I/O libraries: {impure}"
