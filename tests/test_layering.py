"""The import rules of docs/architecture.md, checked on every import statement of the package.

Every ``import`` is read with ``ast``, function-level and ``TYPE_CHECKING`` ones included, so a
deferred import cannot hide a dependency. Units are the subpackages and the top-level modules;
``backends`` counts as two (``backends.base``, the contracts everyone may use, and
``backends.local``, which runs graphs with the execution engine).
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections import defaultdict
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nnsight_dask"
#: What each unit may import of the package (besides itself); units not listed are unrestricted.
ALLOWED = {
    "errors": set(),
    "tensors": set(),
    "config": set(),
    "graph": {"errors", "tensors"},
    "backends.base": {"graph"},
    "execution": {"graph", "tensors", "errors", "backends.base"},
    "tracing": {"graph", "tensors", "errors", "backends.base"},
    "models": {"errors", "config"},
    "storage": {"errors", "tensors", "config"},
    "http_wire": {"errors", "graph", "storage"},
    "limits": {"errors", "config", "graph", "tensors"},
}
#: Units that must work without a cluster: no ``distributed``, no ``dask`` (besides dask.config).
CLUSTER_FREE = {"graph", "tensors", "tracing", "execution", "models", "backends.base", "backends.local", "api",
                "limits"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def unit(module: str) -> str:
    """``nnsight_dask.worker.tasks`` -> ``worker``; ``nnsight_dask.backends.local`` -> ``backends.local``."""
    parts = module.split(".")[1:]
    if not parts:
        return "<root>"
    if parts[0] == "backends":
        return f"backends.{parts[1]}" if len(parts) > 1 else "backends.base"  # its __init__ re-exports base
    return parts[0]


@cache
def imports() -> dict[str, set[str]]:
    """Every module of the package -> the package modules and outside top-level packages it imports."""
    found: dict[str, set[str]] = defaultdict(set)
    for name, path in _modules().items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found[name].update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for alias in node.names:  # ``from . import registry`` imports the module ``registry``
                    candidate = f"{module}.{alias.name}"
                    found[name].add(candidate if candidate in _modules() else module)
    return found


def unit_edges() -> dict[str, dict[str, set[str]]]:
    """unit -> imported unit -> the modules that import it."""
    edges: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for module, targets in imports().items():
        for target in targets:
            if target.startswith("nnsight_dask.") and unit(target) != unit(module):
                edges[unit(module)][unit(target)].add(module)
    return edges


@pytest.mark.parametrize("source", sorted(ALLOWED))
def test_unit_imports_only_what_it_may(source: str) -> None:
    edges = unit_edges().get(source, {})
    forbidden = {target: sorted(by) for target, by in edges.items() if target not in ALLOWED[source]}
    assert not forbidden, f"{source} may import only {sorted(ALLOWED[source])}; found {forbidden}"


@pytest.mark.parametrize("source", sorted(CLUSTER_FREE))
def test_local_layers_never_import_a_cluster(source: str) -> None:
    bad = sorted({f"{module} imports {target}" for module, targets in imports().items() if unit(module) == source
                  for target in targets if target.split(".")[0] in ("distributed", "zarr")
                  or (target.split(".")[0] == "dask" and target != "dask.config")})
    assert not bad, bad


def test_no_import_cycle_between_units() -> None:
    edges = {source: set(targets) - {"<root>"} for source, targets in unit_edges().items() if source != "<root>"}
    cycles = []
    for start in edges:
        stack = [(start, [start])]
        seen: set[str] = set()
        while stack:
            current, path = stack.pop()
            for target in edges.get(current, ()):
                if target == start:
                    cycles.append(" -> ".join([*path, start]))
                elif target not in seen:
                    seen.add(target)
                    stack.append((target, [*path, target]))
    assert not cycles, f"import cycles between units: {sorted(set(cycles))}"


def test_the_rule_checker_sees_deferred_imports(tmp_path: Path) -> None:
    """The checker reads imports inside functions too (what hid the old 21-file import circle)."""
    code = textwrap.dedent("""
        def f():
            from ..client import experiment
            import distributed
    """)
    tree = ast.parse(code)
    seen = [type(node).__name__ for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert seen == ["ImportFrom", "Import"]


def test_local_tracing_loads_neither_distributed_nor_zarr() -> None:
    """A local trace works on a machine that never touches a cluster or a store."""
    script = textwrap.dedent("""
        import sys, torch
        torch.set_num_threads(1)
        import nnsight_dask as nd
        from nnsight_dask.models import tiny_gpt2, tiny_tokenizer
        lm = nd.LanguageModel(tiny_gpt2(), tokenizer=tiny_tokenizer())
        with lm.trace("the cat"):
            logits = lm.output.logits.save()
        assert logits.shape[:2] == (1, 2)
        print(sorted(m for m in ("distributed", "zarr") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_gateway_records_and_runs_no_graph_itself() -> None:
    """The HTTP gateway decodes, validates and forwards graphs to the cluster; its own modules never
    record (``tracing``) or run (``execution``, ``models``, ``backends.local``, ``api``) one, so nothing
    an HTTP user sends is executed in the gateway's process."""
    runs = {"tracing", "execution", "models", "backends.local", "api"}
    bad = sorted(f"{module} imports {target}" for module, targets in imports().items()
                 if module.startswith("nnsight_dask.service.gateway")
                 for target in targets if target.startswith("nnsight_dask.") and unit(target) in runs)
    assert not bad, bad


def circles_of_files() -> list[set[str]]:
    """Every set of modules that import each other round in a circle (strongly connected, size > 1)."""
    modules = _modules()
    graph = {m: sorted(d for d in deps if d in modules and d != m) for m, deps in imports().items()}
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(module: str) -> None:  # Tarjan's algorithm
        order[module] = low[module] = len(order)
        stack.append(module)
        for target in graph.get(module, ()):
            if target not in order:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], order[target])
        if low[module] == order[module]:
            members = set()
            while True:
                member = stack.pop()
                members.add(member.removeprefix("nnsight_dask."))
                if member == module:
                    break
            if len(members) > 1:
                found.append(members)

    for module in sorted(graph):
        if module not in order:
            visit(module)
    return found


def test_no_circle_of_files() -> None:
    """Files import one way inside the package too, as docs/architecture.md says. The six circles of
    issue 22 were cut by moving the shared piece down: the worker's (the registry names its entries by
    protocol), storage.results lazy/ref (LazyTensor.open takes a location), client remote/http_remote
    (both transports subclass client.remote_model.RemoteModel), the gateway's handlers/server (they
    serve with a GatewayCore), tracing's proxy/recorder/control_flow (they know the recorder as the
    Recording protocol) and tracing's model/tracer/envoy (they know the wrapper as the Traceable protocol)."""
    circles = [sorted(circle) for circle in circles_of_files()]
    assert not circles, f"circles of files: {circles}"
