"""Python ``if``/``elif``/``else`` on a traced value, recorded as conditionals.

While recording, a traced value has no truth value: it exists only when the model runs. nnsight
0.4 (``CONFIG.APP.CONTROL_FLOW_HANDLING``) therefore turns ``if x:`` into ``with tracer.cond(x):``
and its ``else`` into ``with tracer.cond(not x):``; so does this module, without re-running or
re-compiling the user's code.

How: ``bool(proxy)`` finds the ``if`` statement being decided in the caller's source (by line
number, in the parsed file), records its condition, and puts a line tracer on that frame only. The
branches then run natively, one after the other, each under its condition: the ``if`` body first;
when the frame reaches a line outside the body, the tracer closes the condition, opens ``not x``
and jumps to the ``else`` (an ``elif`` is an ``if`` inside it, handled the same way when its test is
traced too); the next line outside the ``else`` closes that. Because both branches really run,
local names assigned in both hold the ``else`` branch's value afterwards, as in nnsight 0.4.

What cannot be recorded this way is refused with the spelling that works (``tracer.cond``):
no source (``exec`` of a string), a branch on the line of its test, ``break``/``continue``/
``return``/``yield`` inside a branch (Python would decide them now), ``while`` and conditional
expressions on traced values. ``for x in proxy`` needs no tracer: a traced list whose length is
known while recording unrolls natively (see :mod:`.lengths`).
"""
from __future__ import annotations

import ast
import copy
import functools
import linecache
import sys
import threading
import warnings
from dataclasses import dataclass
from types import FrameType
from typing import Any

from ..errors import TracingError
from ..graph.node import Kind
from .conditions import CondBlock
from .proxy import Proxy
from .recording import Recording

_local = threading.local()


def branch(proxy: Proxy, frame: FrameType) -> bool | None:
    """Enter the ``if`` whose test ``proxy`` decides in ``frame``; ``None`` when there is none to enter
    (the caller then refuses the truth value with the reason)."""
    if getattr(_local, "evaluating", False):
        return None  # a truth value asked while re-evaluating a test (e.g. `x in [...]`): not an `if`
    if getattr(_local, "no_branches", False):
        raise TracingError(_NO_BRANCHES)
    node = if_at(frame.f_code.co_filename, frame.f_lineno, frame.f_globals)
    if node is None:
        return None
    pending = _pending()
    for open_branch in pending:
        if open_branch.frame is frame and open_branch.node is node and open_branch.state == "test":
            return True  # another operand of the same test (`a and b`): the branch is already recorded
    refuse_unrecordable(node, frame.f_code.co_filename)
    condition = proxy if _decided_by_its_value(node.test) else _evaluate(node.test, frame)
    pending.append(_Branch(frame, node, proxy._recorder, condition))
    _trace(frame)
    return True


def depth() -> int:
    """How many branches are open in this thread (a tracing context notes it when it opens)."""
    return len(_pending())


def close_from(opened_at: int, finished: bool) -> None:
    """A tracing context that opened at depth ``opened_at`` exits: close the branches opened inside it
    and still open. With ``finished`` (no exception) an ``else`` not yet entered is recorded from its
    source, as at a frame's return."""
    pending = _pending()
    while len(pending) > opened_at:
        pending.pop().finish(record_else=finished)
    _untrace_if_done()


# -- finding the statement ------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _parsed(filename: str, source: str) -> dict[int, list[ast.If]]:
    """Each line of ``source`` mapped to the ``if`` statements whose test covers it."""
    by_line: dict[int, list[ast.If]] = {}
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.If):
            for line in range(node.lineno, (node.test.end_lineno or node.test.lineno) + 1):
                by_line.setdefault(line, []).append(node)
    return by_line


def if_at(filename: str, line: int, module_globals: dict[str, Any]) -> ast.If | None:
    """The one ``if`` statement whose test is at ``line`` of ``filename`` (IPython cells included:
    they are in ``linecache``), or ``None``."""
    lines = linecache.getlines(filename, module_globals)
    if not lines:
        return None
    try:
        candidates = _parsed(filename, "".join(lines)).get(line, [])
    except SyntaxError:
        return None
    return candidates[0] if len(candidates) == 1 else None


def refuse_unrecordable(node: ast.If, filename: str) -> None:
    """Refuse an ``if`` whose branches cannot both be recorded, naming why."""
    where = f"{filename}:{node.lineno}"
    last_test_line = node.test.end_lineno or node.test.lineno
    if node.body[0].lineno <= last_test_line or (node.orelse and node.orelse[0].lineno <= last_test_line):
        raise TracingError(f"the `if` at {where} tests a traced value, so both branches are recorded as "
                           "conditionals; write each branch on its own lines (not on the line of the test)")
    for statement in [*node.body, *node.orelse]:
        escape = _escape(statement)
        if escape is not None:
            raise TracingError(
                f"the `if` at {where} tests a traced value, which exists only when the model runs, so both "
                f"branches are recorded as conditionals; `{escape}` inside a branch would be decided now. "
                "Move it out of the branch")


class _Escapes(ast.NodeVisitor):
    """Finds ``break``/``continue`` that leave the branch and ``return``/``yield``/``await`` in it."""

    def __init__(self) -> None:
        self.found: str | None = None
        self.loops = 0

    def generic_visit(self, node: ast.AST) -> None:
        if self.found is None:
            super().generic_visit(node)

    def visit_FunctionDef(self, node: ast.AST) -> None:  # their own scope
        return

    visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = visit_FunctionDef

    def _loop(self, node: ast.For | ast.While | ast.AsyncFor) -> None:
        self.loops += 1
        for child in node.body:
            self.visit(child)
        self.loops -= 1
        for child in node.orelse:
            self.visit(child)

    visit_For = visit_While = visit_AsyncFor = _loop

    def visit_Break(self, node: ast.Break) -> None:
        if not self.loops:
            self.found = "break"

    def visit_Continue(self, node: ast.Continue) -> None:
        if not self.loops:
            self.found = "continue"

    def visit_Return(self, node: ast.Return) -> None:
        self.found = "return"

    def visit_Yield(self, node: ast.AST) -> None:
        self.found = "yield"

    visit_YieldFrom = visit_Yield

    def visit_Await(self, node: ast.Await) -> None:
        self.found = "await"


def _escape(statement: ast.stmt) -> str | None:
    finder = _Escapes()
    finder.visit(statement)
    return finder.found


# -- the condition --------------------------------------------------------------------------------
def _decided_by_its_value(test: ast.expr) -> bool:
    """Whether Python asks the truth of the test's own value (so the proxy asked is the condition)."""
    if isinstance(test, (ast.BoolOp, ast.IfExp, ast.NamedExpr)):
        return False
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return False
    if isinstance(test, ast.Compare):
        return len(test.ops) == 1 and not isinstance(test.ops[0], (ast.In, ast.NotIn))
    return True


class _TracedLogic(ast.NodeTransformer):
    """``and``/``or``/``not`` and chained comparisons as calls that combine traced values."""

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.expr:
        helper = "__nd_all__" if isinstance(node.op, ast.And) else "__nd_any__"
        thunks = [ast.Lambda(_no_arguments(), self.visit(value)) for value in node.values]
        return ast.Call(ast.Name(helper, ast.Load()), thunks, [])

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.expr:
        if isinstance(node.op, ast.Not):
            return ast.Call(ast.Name("__nd_not__", ast.Load()), [self.visit(node.operand)], [])
        return self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> ast.expr:
        if len(node.ops) == 1:
            return self.generic_visit(node)
        operands = [self.visit(node.left), *(self.visit(c) for c in node.comparators)]
        pairs = [ast.Lambda(_no_arguments(), ast.Compare(operands[k], [op], [operands[k + 1]]))
                 for k, op in enumerate(node.ops)]
        return ast.Call(ast.Name("__nd_all__", ast.Load()), pairs, [])


def _no_arguments() -> ast.arguments:
    return ast.arguments(posonlyargs=[], args=[], vararg=None, kwonlyargs=[], kw_defaults=[], kwarg=None,
                         defaults=[])


def _combine(target: str, short_circuit: bool) -> Any:
    """``all``/``any`` over thunks, as Python's ``and``/``or`` until a traced value makes it a node."""
    def combine(*thunks: Any) -> Any:
        values: list[Any] = []
        for thunk in thunks:
            value = thunk()
            if not values and not isinstance(value, Proxy) and bool(value) is short_circuit:
                return value
            if values or isinstance(value, Proxy):
                values.append(value)
        if not values:
            return value
        recorder = next(v for v in values if isinstance(v, Proxy))._recorder
        return recorder.add(Kind.OP, (values,), target=target)
    return combine


def _not(value: Any) -> Any:
    if isinstance(value, Proxy):
        return value._recorder.add(Kind.OP, (value,), target="operator.not_")
    return not value


def _evaluate(test: ast.expr, frame: FrameType) -> Any:
    """The test's value with ``and``/``or``/``not`` over traced values recorded as nodes."""
    expression = ast.Expression(_TracedLogic().visit(copy.deepcopy(test)))
    ast.fix_missing_locations(expression)
    namespace = dict(frame.f_globals)
    namespace.update(frame.f_locals)  # one namespace, so the lambdas see the frame's locals
    namespace.update(__nd_all__=_combine("builtins.all", False), __nd_any__=_combine("builtins.any", True),
                     __nd_not__=_not)
    _local.evaluating = True
    try:
        return eval(compile(expression, frame.f_code.co_filename, "eval"), namespace)
    finally:
        _local.evaluating = False


def _set_line(frame: FrameType, line: int) -> None:
    """Continue ``frame`` at ``line``. Python 3.13 sets the frame's still unbound locals to ``None`` on
    such a jump and warns about it ("assigning None to 1 unbound local"); those are names the code
    assigns later (after the ``if``), so the warning says nothing to the user and is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"assigning None to \d+ unbound local", RuntimeWarning)
        frame.f_lineno = line


# -- running the branches --------------------------------------------------------------------------
@dataclass(eq=False)
class _Branch:
    """One ``if`` on a traced value, from its test to the end of its ``else``."""

    frame: FrameType
    node: ast.If
    recorder: Recording
    condition: Any
    state: str = "test"  # then "body", then "else" (if any)
    block: CondBlock | None = None

    @property
    def _test_lines(self) -> tuple[int, int]:
        return self.node.test.lineno, self.node.test.end_lineno or self.node.test.lineno

    @property
    def _body_lines(self) -> tuple[int, int]:
        return self.node.body[0].lineno, self.node.body[-1].end_lineno or self.node.body[-1].lineno

    @property
    def _else_lines(self) -> tuple[int, int]:
        first = self.node.orelse[0]
        start = first.test.lineno if isinstance(first, ast.If) else first.lineno
        return start, self.node.orelse[-1].end_lineno or self.node.orelse[-1].lineno

    def _open(self, condition: Any) -> None:
        self.block = CondBlock(lambda: self.recorder, condition)
        self.block.__enter__()

    def _close(self) -> None:
        if self.block is not None:
            self.block.__exit__(None, None, None)
            self.block = None

    def on_line(self, line: int) -> str:
        """Advance on a line event of the frame: ``"inside"`` (still in this ``if``), ``"jumped"``
        (the frame now continues elsewhere) or ``"done"``."""
        if self.state == "test":
            first, last = self._test_lines
            if first <= line <= last:
                return "inside"  # the rest of a test written over several lines
            self._open(self.condition)
            self.state = "body"
            if line != self._body_lines[0]:
                return self._jump(self._body_lines[0])
            return "inside"
        if self.state == "body":
            first, last = self._body_lines
            if first <= line <= last:
                return "inside"
            self._close()
            if not self.node.orelse:
                return "done"
            self._enter_else()
            try:
                _set_line(self.frame, self._else_lines[0])
            except ValueError:
                # Python 3.10 refuses to jump back into a `with` body from its exit (the `if` ended
                # the block): record the else from its source, as at a frame's return
                self._record_else_from_source()
                return "done"
            return "jumped"
        first, last = self._else_lines
        if first <= line <= last:
            return "inside"
        self._close()
        return "done"

    def _jump(self, line: int) -> str:
        try:
            _set_line(self.frame, line)
        except ValueError as error:
            self._close()
            raise TracingError(f"the `if` at {self.frame.f_code.co_filename}:{self.node.lineno} tests a traced "
                               f"value, but its branch at line {line} could not be entered ({error}); write "
                               "`with tracer.cond(x):` instead") from None
        return "jumped"

    def finish(self, record_else: bool) -> None:
        """The frame returns (or its tracing context exits) inside this ``if``: close it, recording an
        ``else`` not entered yet from its source (a branch cannot be jumped to from a return)."""
        if self.state == "test":
            self._open(self.condition)
            self.state = "body"
        self._close()
        if self.state == "body" and self.node.orelse and record_else:
            self._enter_else()
            self._record_else_from_source()

    def _enter_else(self) -> None:
        self._open(_not(self.condition))
        self.state = "else"

    def _record_else_from_source(self) -> None:
        """Run the ``else`` from its source under ``not x``, where the frame cannot jump to it."""
        try:
            _run_statements(self.node.orelse, self.frame)
        finally:
            self._close()


def _run_statements(statements: list[ast.stmt], frame: FrameType) -> None:
    """Run ``statements`` from their source in ``frame``'s namespace (nested traced ``if``s refused:
    no line events reach code run from here)."""
    module = ast.Module(body=statements, type_ignores=[])
    code = compile(module, frame.f_code.co_filename, "exec")
    _local.no_branches = True
    try:
        exec(code, frame.f_globals, frame.f_locals)
    finally:
        _local.no_branches = False


_NO_BRANCHES = ("an `if` on a traced value inside the `else` of another one that ends its function (or its "
                "`with` block) cannot be recorded: write `with tracer.cond(x):` there, or move the outer "
                "`if` so a statement follows it")


# -- the line tracer --------------------------------------------------------------------------------
def _pending() -> list[_Branch]:
    pending = getattr(_local, "pending", None)
    if pending is None:
        pending = _local.pending = []
    return pending


def _trace(frame: FrameType) -> None:
    """Line events of ``frame`` (only) reach :func:`_on_event` until its branches are closed."""
    if getattr(_local, "previous", _UNSET) is _UNSET:
        _local.previous = sys.gettrace()
        _local.frames = {}
        sys.settrace(_on_call)
    frames: dict[int, tuple[FrameType, Any]] = _local.frames
    if id(frame) not in frames:
        frames[id(frame)] = (frame, frame.f_trace)
        frame.f_trace = _on_event
        frame.f_trace_lines = True


_UNSET = object()


def _on_call(frame: FrameType, event: str, arg: Any) -> Any:
    """The thread's trace function while branches are open: leaves new frames to the previous one."""
    previous = getattr(_local, "previous", None)
    return previous(frame, event, arg) if previous is not None else None


def _on_event(frame: FrameType, event: str, arg: Any) -> Any:
    """The local trace function of a frame with open branches (the frame's previous one still called)."""
    previous = _local.frames[id(frame)][1]
    if event == "line":
        _on_line(frame)
    elif event == "return":
        _on_return(frame)
    if previous is not None:
        previous(frame, event, arg)
    return None  # keeps frame.f_trace as it is now: ours, or the previous one once untraced


def _on_line(frame: FrameType) -> None:
    pending = _pending()
    line = frame.f_lineno
    while pending and pending[-1].frame is frame:
        outcome = pending[-1].on_line(line)
        if outcome == "done":
            pending.pop()
            continue
        break
    _untrace_if_done()


def _on_return(frame: FrameType) -> None:
    pending = _pending()
    while pending and pending[-1].frame is frame:
        open_branch = pending.pop()
        open_branch.finish(record_else=True)
    _untrace_if_done()


def _untrace_if_done() -> None:
    """Give the thread and the frames back their previous trace functions once no branch is open."""
    frames = getattr(_local, "frames", None)
    if frames is None:
        return
    open_frames = {id(b.frame) for b in _pending()}
    for key in [k for k in frames if k not in open_frames]:
        frame, previous = frames.pop(key)
        frame.f_trace = previous
    if not frames:
        sys.settrace(_local.previous)
        del _local.previous, _local.frames
