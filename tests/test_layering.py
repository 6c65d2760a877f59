"""The import rules of docs/architecture.md, checked on every import statement of the package.

Every ``import`` is read with ``ast``, function-level and ``TYPE_CHECKING`` ones included, so a
deferred import cannot hide a dependency. Units are the subpackages and the top-level modules;
``backends`` counts as two (``backends.base``, the contracts everyone may use, and
``backends.local``, which runs graphs with the execution engine). Inside and across units, files
import one way too (no circle of files), no module uses another's private (``_x``) names, and no
class outgrows one job (:data:`LONGEST_CLASS` lines). The checkers take a package directory, so
they are tested on small packages written for the purpose as well as run on ours.
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


#: Lines a class may span (issue 22: a class past this does several jobs; split it by job).
LONGEST_CLASS = 300


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {_module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def _package_of(module: str, path: Path) -> str:
    """The package a module's relative imports start from (a package's ``__init__`` is its own)."""
    return module if path.name == "__init__.py" else module.rsplit(".", 1)[0]


def _imported_module(node: ast.ImportFrom, package: str) -> str:
    """The absolute name of the module a ``from ... import`` reads from."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    return ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))


def unit(module: str) -> str:
    """``nnsight_dask.worker.tasks`` -> ``worker``; ``nnsight_dask.backends.local`` -> ``backends.local``."""
    parts = module.split(".")[1:]
    if not parts:
        return "<root>"
    if parts[0] == "backends":
        return f"backends.{parts[1]}" if len(parts) > 1 else "backends.base"  # its __init__ re-exports base
    return parts[0]


@cache
def imports(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Every module of the package -> the package modules and outside top-level packages it imports."""
    modules = _modules(package)
    found: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found[name].update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                module = _imported_module(node, _package_of(name, path))
                for alias in node.names:  # ``from . import registry`` imports the module ``registry``
                    candidate = f"{module}.{alias.name}"
                    found[name].add(candidate if candidate in modules else module)
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


def circles_of_files(package: Path = PACKAGE) -> list[set[str]]:
    """Every set of modules that import each other round in a circle (strongly connected, size > 1)."""
    modules = _modules(package)
    prefix = f"{package.name}."
    graph = {m: sorted(d for d in deps if d in modules and d != m) for m, deps in imports(package).items()}
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
                members.add(member.removeprefix(prefix))
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


def private_uses(package: Path = PACKAGE) -> list[str]:
    """Every place a module of the package uses a private name of another module.

    Private means a leading underscore (dunders such as ``__version__`` are public). Caught:
    ``from m import _x``, ``m._x`` on a module bound by an import, and a private module (``_m.py``)
    imported from outside its own package: like zarr's ``storage/_local.py``, a private module is
    for its package's modules (its ``__init__`` re-exports what others may use).
    """
    modules = _modules(package)
    found: list[str] = []
    for name, path in modules.items():
        here = _package_of(name, path)
        bound: dict[str, str] = {}  # local name -> package module it is bound to by an import
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        bound[alias.asname or alias.name] = alias.name
                        _check_private_module(alias.name, name, here, node.lineno, found)
            elif isinstance(node, ast.ImportFrom):
                source = _imported_module(node, here)
                if source not in modules:
                    continue
                _check_private_module(source, name, here, node.lineno, found)
                for alias in node.names:
                    candidate = f"{source}.{alias.name}"
                    if candidate in modules:
                        bound[alias.asname or alias.name] = candidate
                        _check_private_module(candidate, name, here, node.lineno, found)
                    elif _private(alias.name):
                        found.append(f"{name}:{node.lineno} imports {alias.name} from {source}")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and _private(node.attr) and f"{bound[node.value.id]}.{node.attr}" not in modules):
                found.append(f"{name}:{node.lineno} uses {node.value.id}.{node.attr} of {bound[node.value.id]}")
    return sorted(set(found))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _check_private_module(module: str, importer: str, importer_package: str, line: int, found: list[str]) -> None:
    parent, _, last = module.rpartition(".")
    if _private(last) and importer_package != parent and importer != module:
        found.append(f"{importer}:{line} imports the private module {module} from outside {parent}")


#: Private attributes of other libraries' objects we read on purpose: torch modules' hook and
#: parameter tables, ``Tensor._base``, ``sys._getframe`` and ``torch._C``. Dask's and Bokeh's live in
#: ``dask_compat`` alone, whose job that is.
FOREIGN_PRIVATE = frozenset({"_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks",
                             "_backward_hooks", "_backward_pre_hooks", "_base", "_getframe", "_C",
                             "_VariableFunctions"})
#: A proxy's own state, read by the rest of ``tracing``: underscored because a proxy's attribute
#: namespace is the traced value's (``hidden.node`` records a getattr), and read directly because
#: recording is the hot path of a local trace.
PROXY_STATE = frozenset({"_node", "_recorder", "_value", "_has_value", "_save_node", "_live"})


def private_attribute_uses(package: Path = PACKAGE) -> list[str]:
    """``obj._x`` where ``_x`` is nowhere defined in the module reading it: another module's private
    state (``self._x``/``cls._x`` are the class's own, or its base's hooks, and are not counted).

    Defined means assigned, a def or class name, or a string starting with ``_`` (``__slots__``,
    ``object.__setattr__(self, "_x", ...)``); lenient, so it misses some uses but does not invent any.
    """
    found = []
    for name, path in _modules(package).items():
        if name.endswith(".dask_compat"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        defined: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                defined.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("_"):
                defined.add(node.value)
        allowed = FOREIGN_PRIVATE | (PROXY_STATE if ".tracing." in f"{name}." else frozenset())
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)) or node.attr in defined | allowed:
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
                continue
            found.append(f"{name}:{node.lineno} reads {ast.unparse(node)}")
    return sorted(found)


def long_classes(package: Path = PACKAGE, limit: int = LONGEST_CLASS) -> list[str]:
    """Every class of the package spanning more than ``limit`` lines, with its length."""
    found = []
    for name, path in _modules(package).items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > limit:
                    found.append(f"{name}.{node.name}: {lines} lines")
    return found


def test_no_private_name_used_across_modules() -> None:
    """A private name stays in its module; what another module needs is public API of a small module
    (STYLE.md 15). Tests may still reach into a module they test: a rename breaks them loudly."""
    assert not private_uses(), private_uses()


def test_no_private_attribute_of_another_module_is_read() -> None:
    """Objects too: a class's ``_x`` is read by its own module (and its subclasses' ``self``); others
    get what they need through the constructor or a public method (the remote backends once read the
    wrapper's ``_module``)."""
    assert not private_attribute_uses(), private_attribute_uses()


def test_no_class_outgrows_one_job() -> None:
    assert not long_classes(), f"classes over {LONGEST_CLASS} lines: {long_classes()}"


def _write_package(root: Path, files: dict[str, str]) -> Path:
    """A package ``pkg`` under ``root`` with ``files`` (path inside the package -> source)."""
    package = root / "pkg"
    for relative, source in {"__init__.py": "", **files}.items():
        target = package / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(source))
    return package


def test_the_checkers_see_deferred_imports_and_private_names(tmp_path: Path) -> None:
    """Run on a package written to break every rule: a circle closed only by an import inside a
    function (what hid the old 21-file import circle), private names taken across modules, and a
    private module used from outside its package (its own package may use it)."""
    package = _write_package(tmp_path, {
        "a.py": "from . import b\n",
        "b.py": """
            def later():
                from .a import thing
                return thing
        """,
        "c.py": """
            from .b import _helper
            from . import b
            from .sub import _impl
            from .sub._impl import build

            def use():
                return b._state, build
        """,
        "sub/__init__.py": "from ._impl import build\n",
        "sub/_impl.py": "def build():\n    return 1\n",
        "sub/user.py": "from . import _impl\nfrom ._impl import build\n",
    })
    assert circles_of_files(package) == [{"a", "b"}]
    assert private_uses(package) == [
        "pkg.c:2 imports _helper from pkg.b",
        "pkg.c:4 imports the private module pkg.sub._impl from outside pkg.sub",
        "pkg.c:5 imports the private module pkg.sub._impl from outside pkg.sub",
        "pkg.c:8 uses b._state of pkg.b",
    ]


def test_the_attribute_checker_sees_another_module_s_private_state(tmp_path: Path) -> None:
    package = _write_package(tmp_path, {
        "holder.py": """
            class Holder:
                __slots__ = ("_slot",)

                def __init__(self):
                    self._state = 1
                    object.__setattr__(self, "_hidden", 2)

                def peek(self, other):
                    return other._state, other._hidden, other._slot
        """,
        "reader.py": """
            from .holder import Holder

            class Reader(Holder):
                def read(self, holder):
                    return self._state, super()._state, holder._state, holder.grad._parameters
        """,
    })
    assert private_attribute_uses(package) == ["pkg.reader:6 reads holder._state"]


def test_the_class_checker_measures_whole_classes(tmp_path: Path) -> None:
    body = "".join(f"    def m{i}(self):\n        return {i}\n" for i in range(10))
    package = _write_package(tmp_path, {"big.py": f"class Big:\n{body}", "small.py": "class Small:\n    pass\n"})
    assert long_classes(package, limit=20) == ["pkg.big.Big: 21 lines"]
    assert long_classes(package, limit=21) == []
