"""Module-level code for run.py (run with runpy, so its frame's locals are its globals)."""
with Trace() as tr:  # noqa: F821 (given by run.py)
    x, y = tr.input("x"), tr.input("y")
    if x > 1:
        tr.mark("A")
    elif y > 0:
        tr.mark("B")
    else:
        tr.mark("C")
    tr.mark("after")
