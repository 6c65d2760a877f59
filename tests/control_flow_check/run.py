"""Check ``nnsight_dask/tracing/control_flow.py`` on any Python 3.10+ interpreter, torch-free.

The line tracer and ``frame.f_lineno`` jumps it relies on are CPython mechanics whose line events
changed between 3.10 and 3.13 (3.12 rebuilt ``settrace`` on ``sys.monitoring``), while the suite
runs on one interpreter with torch. This script loads the real ``control_flow.py`` (with the real
``conditions.py``, ``recording.py``, ``errors.py`` and ``graph/node.py``) into a stand-in package whose recorder keeps
a tiny evaluable graph, records the cases of ``cases.py`` (module level and function frames),
evaluates every recorded mark under concrete inputs, and compares with the same decisions taken by
plain Python.

Usage: ``python tests/control_flow_check/run.py`` (exit status 0 and "ok" when every case agrees).
"""
from __future__ import annotations

import importlib
import itertools
import runpy
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parents[1] / "nnsight_dask"

PROXY = '''
import operator, sys
from ..errors import TracingError

class Proxy:
    def __init__(self, recorder, node):
        self._recorder, self._node = recorder, node
    def _live(self):
        return True
    def __bool__(self):
        entered = self._recorder.enter_branch(self, sys._getframe(1))  # as the real proxy does
        if entered is None:
            raise TracingError("no truth value while recording")
        return entered

def _op(name):
    def method(self, other):
        return self._recorder.add("op", (self, other), target="operator." + name)
    return method

for _name in ("lt", "le", "gt", "ge", "eq", "ne", "add", "mul"):
    setattr(Proxy, "__%s__" % _name, _op(_name))
'''

RECORDER = '''
import builtins, operator
from ..graph.node import Ref
from . import control_flow
from .proxy import Proxy

class Recorder:
    """Nodes as (target, args, cond); ``value`` evaluates one under concrete inputs."""
    def __init__(self):
        self.nodes, self.cond, self.marks = [], None, []
    def add(self, kind, args, target):
        args = tuple(self._ref(a) for a in args)
        self.nodes.append((target, args, self.cond))
        return Proxy(self, len(self.nodes) - 1)
    def _ref(self, obj):
        if isinstance(obj, Proxy):
            return Ref(obj._node)
        if isinstance(obj, list):
            return [self._ref(o) for o in obj]
        return obj
    def input(self, name):
        return self.add("op", (name,), target="input")
    def enter_branch(self, proxy, frame):
        return control_flow.branch(proxy, frame)
    def mark(self, label):
        self.marks.append((label, self.cond))
    def value(self, node, inputs):
        target, args, _ = self.nodes[node]
        args = [self._value(a, inputs) for a in args]
        if target == "input":
            return inputs[args[0]]
        module, name = target.split(".")
        return getattr({"operator": operator, "builtins": builtins}[module], name)(*args)
    def _value(self, obj, inputs):
        if isinstance(obj, Ref):
            return self.value(obj.id, inputs)
        if isinstance(obj, list):
            return [self._value(o, inputs) for o in obj]
        return obj
    def taken(self, inputs):
        return [label for label, cond in self.marks if cond is None or self.value(cond, inputs)]

class Trace:
    """``with Trace() as tr:`` like a tracing context: closes branches still open when it exits."""
    def __enter__(self):
        self.recorder = Recorder()
        self._depth = control_flow.depth()
        return self.recorder
    def __exit__(self, exc_type, *exc):
        control_flow.close_from(self._depth, finished=exc_type is None)
'''


def build(root: Path) -> None:
    """The stand-in package ``fakend``: real control flow, conditions, errors and nodes; stub proxy and recorder."""
    (root / "fakend" / "graph").mkdir(parents=True)
    (root / "fakend" / "tracing").mkdir()
    for package in ("", "graph", "tracing"):
        (root / "fakend" / package / "__init__.py").write_text("")
    shutil.copy(PACKAGE / "errors.py", root / "fakend" / "errors.py")
    shutil.copy(PACKAGE / "graph" / "node.py", root / "fakend" / "graph" / "node.py")
    for module in ("control_flow.py", "conditions.py", "recording.py"):
        shutil.copy(PACKAGE / "tracing" / module, root / "fakend" / "tracing" / module)
    (root / "fakend" / "tracing" / "proxy.py").write_text(PROXY)
    (root / "fakend" / "tracing" / "recorder.py").write_text(RECORDER)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        sys.path.insert(0, tmp)
        sys.path.insert(0, str(HERE))
        recorder_module = importlib.import_module("fakend.tracing.recorder")
        cases = importlib.import_module("cases")
        failures = []
        grid = list(itertools.product((-3, 0, 2, 7), (-1, 4)))
        for name, record, expect in cases.CASES:
            for x, y in grid:
                recorder = record(recorder_module.Trace)
                got = recorder.taken({"x": x, "y": y})
                if got != expect(x, y):
                    failures.append(f"{name} x={x} y={y}: recorded branches ran {got}, Python ran {expect(x, y)}")
        for x, y in grid:  # module-level code: the frame's locals are its globals
            recorder = runpy.run_path(str(HERE / "module_case.py"), {"Trace": recorder_module.Trace})["tr"]
            got = recorder.taken({"x": x, "y": y})
            if got != cases.module_expect(x, y):
                failures.append(f"module x={x} y={y}: {got} != {cases.module_expect(x, y)}")
        if sys.gettrace() is not None:
            failures.append("a trace function was left installed")
    print("\n".join(failures) if failures else f"ok ({sys.version.split()[0]})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
