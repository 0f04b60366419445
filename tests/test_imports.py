"""The package's shape: every module imports alone, no import cycle, a pure core.

Each ``gateway`` module is imported by itself in a process of its own, so none depends
on another having been imported first: a child forked from one that loaded the
third-party libraries and nothing of the gateway (a fresh interpreter for each of the
108 modules took 47 s of a loaded CI run; the libraries were most of it), and each
module of the pure core in a fresh interpreter. The import graph is read from the
source (module-level imports, ``if TYPE_CHECKING:`` ones included, since a type-only
cycle is still two modules that cannot be read apart) and must have no cycle. The pure
core (``adapters/``, ``sse.py``, ``exchange.py``, ``ending.py``, ``pricing.py``,
``http11.py``) loads none of the I/O libraries, and no protocol package imports another.
"""

from __future__ import annotations

import ast
import json
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
    "gateway.decoding",
    "gateway.failures",
    "gateway.span_content",
    "gateway.storewire",
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


# Run by a fresh interpreter: load the libraries, then import each module named in
# argv in a child forked for it; print {module: error} for those that failed.
_FORKED_IMPORTS = """
import importlib, json, os, sys
for library in sys.argv[1].split(","):
    try:
        importlib.import_module(library)
    except ModuleNotFoundError:  # psycopg2, where psycopg (3) is what is installed
        pass
assert not [m for m in sys.modules if m.split(".")[0] in ("gateway", "tests")], "not alone"
failed = {}
for name in sys.argv[2:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(name)
            said = ""
        except BaseException as exc:
            said = f"{type(exc).__name__}: {exc}"
        os.write(write, said.encode()[:60000])
        os._exit(0)
    os.close(write)
    said = b""
    while chunk := os.read(read, 65536):
        said += chunk
    os.close(read)
    _, status = os.waitpid(pid, 0)
    if said or status:
        failed[name] = said.decode() or f"exit status {status}"
print(json.dumps(failed))
"""
# What the gateway imports from outside (I/O libraries included: which of them a pure
# module loads is checked apart, in fresh interpreters).
LIBRARIES = ("flask", "flask_babel", "jinja2", "prometheus_client", *IO_LIBRARIES)


def _imports_forked(names: list[str]) -> dict[str, str]:
    done = subprocess.run(
        [sys.executable, "-c", _FORKED_IMPORTS, ",".join(LIBRARIES), *names],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _import_alone(name: str) -> tuple[str, int, str]:
    check = f"import sys, {name}; print(','.join(m for m in {IO_LIBRARIES!r} if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    return name, done.returncode, done.stdout.strip() if done.returncode == 0 else done.stderr


def test_every_module_imports_alone_in_a_process_of_its_own() -> None:
    names = sorted(modules())
    halves = gevent.pool.Pool(2).map(_imports_forked, [names[0::2], names[1::2]])
    failed = {name: said for half in halves for name, said in half.items()}
    assert not failed, failed


def test_the_check_reports_a_module_that_fails_to_import() -> None:
    assert _imports_forked(["gateway.sse", "gateway.no_such_module"]) == {
        "gateway.no_such_module": "ModuleNotFoundError: No module named 'gateway.no_such_module'"
    }


def test_the_pure_core_loads_no_io_library_in_a_fresh_process() -> None:
    pure = [n for n in sorted(modules()) if any(n == p or n.startswith(p + ".") for p in PURE)]
    assert len(pure) >= len(PURE)
    results = gevent.pool.Pool(2).map(_import_alone, pure)
    failed = {name: out for name, code, out in results if code}
    assert not failed, failed
    impure = {name: loaded for name, _, loaded in results if loaded}
    assert not impure, f"pure modules that load I/O libraries: {impure}"
