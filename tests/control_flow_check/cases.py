"""Cases for run.py: each records under ``Trace`` in a function frame; ``expect`` is plain Python."""
from __future__ import annotations


def if_else(Trace):
    with Trace() as tr:
        x = tr.input("x")
        if x > 1:
            tr.mark("A")
        else:
            tr.mark("B")
        tr.mark("after")
    return tr


def if_else_expect(x, y):
    return ["A" if x > 1 else "B", "after"]


def chain(Trace):
    with Trace() as tr:
        x, y = tr.input("x"), tr.input("y")
        if x > 1 and y > 0:
            tr.mark("A")
        elif 0 <= x < 1:
            tr.mark("B")
        elif not (x > -2) or y > 3:
            tr.mark("C")
        else:
            tr.mark("D")
        tr.mark("after")
    return tr


def chain_expect(x, y):
    if x > 1 and y > 0:
        return ["A", "after"]
    if 0 <= x < 1:
        return ["B", "after"]
    return ["C" if not (x > -2) or y > 3 else "D", "after"]


def nested_in_a_loop(Trace):
    with Trace() as tr:
        x, y = tr.input("x"), tr.input("y")
        for k in range(2):
            if x > k:
                if y > 0:
                    tr.mark(f"A{k}")
                else:
                    tr.mark(f"B{k}")
            tr.mark(f"C{k}")
    return tr


def nested_in_a_loop_expect(x, y):
    taken = []
    for k in range(2):
        if x > k:
            taken.append(f"A{k}" if y > 0 else f"B{k}")
        taken.append(f"C{k}")
    return taken


def _helper(tr, x):
    if x > 1:
        tr.mark("A")
    else:
        tr.mark("B")


def in_a_helper(Trace):
    with Trace() as tr:
        _helper(tr, tr.input("x"))
        tr.mark("after")
    return tr


def last_in_the_block(Trace):
    with Trace() as tr:
        x = tr.input("x")
        if x > 1:
            tr.mark("A")
        else:
            tr.mark("B")
    return tr


def last_in_the_block_expect(x, y):
    return ["A" if x > 1 else "B"]


def elif_on_a_python_value(Trace):
    flag = True
    with Trace() as tr:
        x = tr.input("x")
        if x > 1:
            tr.mark("A")
        elif flag:
            tr.mark("B")
        else:
            tr.mark("C")
    return tr


def elif_on_a_python_value_expect(x, y):
    return ["A" if x > 1 else "B"]


def else_assigns_a_local(Trace):
    with Trace() as tr:
        x = tr.input("x")
        label = "none"
        if x > 1:
            label = "A"
        else:
            label = "B"
    tr.mark(label)  # both branches were recorded, the else last: the name holds its value
    return tr


def else_assigns_a_local_expect(x, y):
    return ["B"]


def module_expect(x, y):
    return ["A" if x > 1 else "B" if y > 0 else "C", "after"]


CASES = [
    ("if/else", if_else, if_else_expect),
    ("and/or/not/chained elif", chain, chain_expect),
    ("nested, in a loop", nested_in_a_loop, nested_in_a_loop_expect),
    ("ending a helper function", in_a_helper, if_else_expect),
    ("last statement of the block", last_in_the_block, last_in_the_block_expect),
    ("elif on a Python value", elif_on_a_python_value, elif_on_a_python_value_expect),
    ("an else that assigns a local and ends the block", else_assigns_a_local, else_assigns_a_local_expect),
]
