"""Python `if`/`elif`/`else` on traced values recorded as conditionals, and `for` over traced lists
(issue 14 item 12), checked against the same decisions taken in plain PyTorch hooks."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import nnsight_dask as nd
from nnsight_dask.errors import TracingError

PROMPT = "The Eiffel Tower is in the city of"


def layer0_sum(lm) -> float:
    with lm.trace(PROMPT):
        total = lm.model.layers[0].output.sum().save()
    return float(total)


def logits_with_hooks(lm, hooks) -> torch.Tensor:
    """The plain model's logits with forward hooks ``(module, hook)`` in place: the reference."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            return lm._module(**lm.encode(PROMPT)).logits
    finally:
        for handle in handles:
            handle.remove()


def hooked_logits(lm, factor_of) -> torch.Tensor:
    """Logits with layer 1's output scaled by ``factor_of(sum of layer 0's output)``, with hooks."""
    seen = {}

    def read(_m, _a, out):
        seen["sum"] = float(out.sum())

    def scale(_m, _a, out):
        return out * factor_of(seen["sum"])

    layers = lm._module.model.layers
    return logits_with_hooks(lm, [(layers[0], read), (layers[1], scale)])


@pytest.mark.parametrize("above", [True, False])
def test_if_else_on_a_traced_value_records_both_branches_as_conditionals(lm, above):
    threshold = layer0_sum(lm) + (-1.0 if above else 1.0)
    with lm.trace(PROMPT):
        total = lm.model.layers[0].output.sum()
        if total > threshold:
            lm.model.layers[1].output = lm.model.layers[1].output * 2
        else:
            lm.model.layers[1].output = lm.model.layers[1].output * 0
        logits = lm.output.logits.save()
    reference = hooked_logits(lm, lambda s: 2 if s > threshold else 0)
    assert torch.allclose(logits, reference, atol=1e-6)
    assert sys.gettrace() is None  # the line tracer is gone


@pytest.mark.parametrize("offset, factor", [(-1.0, 2), (2.0, 3), (0.5, 0)])
def test_elif_chain_and_compound_tests(lm, offset, factor):
    """`and`, chained comparisons, `not` and `or` over traced values, through an if/elif/else chain."""
    total0 = layer0_sum(lm)
    low = total0 + offset
    with lm.trace(PROMPT):
        total = lm.model.layers[0].output.sum()
        if total > low and total < low + 1000:
            lm.model.layers[1].output = lm.model.layers[1].output * 2
        elif low - 1000 < total < low - 1:
            lm.model.layers[1].output = lm.model.layers[1].output * 3
        elif not (total < low) or total > low + 5000:
            lm.model.layers[1].output = lm.model.layers[1].output * 5
        else:
            lm.model.layers[1].output = lm.model.layers[1].output * 0
        logits = lm.output.logits.save()

    def decide(s):
        if low < s < low + 1000:
            return 2
        if low - 1000 < s < low - 1:
            return 3
        return 5 if not s < low or s > low + 5000 else 0

    assert decide(total0) == factor
    assert torch.allclose(logits, hooked_logits(lm, decide), atol=1e-6)


def test_nested_ifs_a_python_loop_and_an_if_without_else(lm):
    """Branches inside branches, one `if` per layer of a plain loop, conditions on values of the run."""
    with lm.trace(PROMPT):
        for layer in lm.model.layers[:3]:
            out = layer.output
            if out[0, -1, 0] > 0:
                if out[0, -1, 1] > 0:
                    layer.output = out * 0.5
                else:
                    layer.output = out * 0.25
            if out.abs().max() > 1000:
                layer.output = out * 0
        logits = lm.output.logits.save()

    def halve(_m, _a, out):
        if out[0, -1, 0] > 0:
            out = out * (0.5 if out[0, -1, 1] > 0 else 0.25)
        return out * 0 if out.abs().max() > 1000 else out

    reference = logits_with_hooks(lm, [(layer, halve) for layer in lm._module.model.layers[:3]])
    assert torch.allclose(logits, reference, atol=1e-6)


def ablate_if_large(lm, threshold):
    """An intervention helper that ends with an if/else: its else is recorded when the function returns."""
    out = lm.model.layers[1].output
    if out.norm() > threshold:
        lm.model.layers[1].output = out * 0
    else:
        lm.model.layers[1].output = out * 3


@pytest.mark.parametrize("large", [True, False])
def test_if_else_ending_a_helper_function(lm, large):
    with lm.trace(PROMPT):
        norm = lm.model.layers[1].output.norm().save()
    threshold = float(norm) + (-1 if large else 1)
    with lm.trace(PROMPT):
        ablate_if_large(lm, threshold)
        logits = lm.output.logits.save()

    def scale(_m, _a, out):
        return out * (0 if out.norm() > threshold else 3)

    reference = logits_with_hooks(lm, [(lm._module.model.layers[1], scale)])
    assert torch.allclose(logits, reference, atol=1e-6)


def test_both_branches_are_recorded_so_a_name_holds_the_else_value(lm):
    """As in nnsight 0.4: both branches run while recording; a save in the branch not taken is None."""
    with lm.trace(PROMPT):
        total = lm.model.layers[0].output.sum()
        if total > -1e9:
            taken = lm.model.layers[1].output.sum().save()
            which = "if"
        else:
            skipped = lm.model.layers[1].output.sum().save()
            which = "else"
    assert which == "else"
    assert isinstance(taken, torch.Tensor) and skipped is None


def test_if_inside_an_invoke_and_in_generation_steps(lm):
    with lm.generate(PROMPT, max_new_tokens=3) as tracer:
        with tracer.all():
            last = lm.model.layers[0].output[:, -1]
            if last.sum() > 1e9:
                lm.model.layers[0].output[:, -1] = 0  # never: the sum is far smaller
            else:
                lm.model.layers[0].output[:, -1] = last * 1.0
        tokens = lm.generator.output.save()
    with lm.generate(PROMPT, max_new_tokens=3):
        plain = lm.generator.output.save()
    assert torch.equal(tokens, plain)


def test_session_level_if_on_an_earlier_traces_value(lm):
    with lm.session():
        with lm.trace(PROMPT):
            top = lm.output.logits[0, -1].argmax()
        if top >= 0:
            with lm.trace(PROMPT):
                lm.model.layers[1].output = lm.model.layers[1].output * 0
                zeroed = lm.output.logits.save()
        else:
            with lm.trace(PROMPT):
                untouched = lm.output.logits.save()
    assert untouched is None
    assert torch.allclose(zeroed, hooked_logits(lm, lambda s: 0), atol=1e-6)


def test_in_a_notebook_cell(lm):
    """A researcher's notebook: the cell's source comes from IPython (through linecache), its frame is
    module-like, and the `if` sits in a plain loop of the cell."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    threshold = layer0_sum(lm)
    shell.user_ns.update(lm=lm, PROMPT=PROMPT, thresholds=[threshold - 1, threshold + 1])
    cell = (
        "results = []\n"
        "for threshold in thresholds:\n"
        "    with lm.trace(PROMPT):\n"
        "        if lm.model.layers[0].output.sum() > threshold:\n"
        "            lm.model.layers[1].output = lm.model.layers[1].output * 2\n"
        "        else:\n"
        "            lm.model.layers[1].output = lm.model.layers[1].output * 0\n"
        "        logits = lm.output.logits.save()\n"
        "    results.append(logits)\n")
    outcome = shell.run_cell(cell)
    assert outcome.success, outcome.error_in_exec or outcome.error_before_exec
    below, above = shell.user_ns["results"]
    assert torch.allclose(below, hooked_logits(lm, lambda s: 2), atol=1e-6)
    assert torch.allclose(above, hooked_logits(lm, lambda s: 0), atol=1e-6)
    assert sys.gettrace() is None


def test_an_error_inside_a_branch_fails_the_trace_and_removes_the_tracer(lm):
    with pytest.raises(Exception), lm.trace(PROMPT):
        if lm.model.layers[0].output.sum() > 0:
            lm.model.layers[99].output = 0
    assert sys.gettrace() is None
    with lm.trace(PROMPT):  # the model and the next trace are unaffected
        logits = lm.output.logits.save()
    assert torch.allclose(logits, hooked_logits(lm, lambda s: 1), atol=1e-6)


def test_a_previous_trace_function_is_kept(lm):
    events = []

    def tracer(frame, event, arg):
        events.append(event)
        return None

    sys.settrace(tracer)
    try:
        with lm.trace(PROMPT):
            if lm.model.layers[0].output.sum() > 0:
                lm.model.layers[1].output = lm.model.layers[1].output * 1
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(None)
    assert "call" in events


def test_what_cannot_be_recorded_is_refused_with_the_spelling_that_works(lm):
    with pytest.raises(TracingError, match="own lines"), lm.trace(PROMPT):
        if lm.model.layers[0].output.sum() > 0: lm.model.layers[1].output = 0  # noqa: E701
    with pytest.raises(TracingError, match="`break` inside a branch"), lm.trace(PROMPT):
        for _ in range(2):
            if lm.model.layers[0].output.sum() > 0:
                break
    with pytest.raises(TracingError, match=r"`while`.*tracer.cond"), lm.trace(PROMPT):
        while lm.model.layers[0].output.sum() > 0:
            pass
    with pytest.raises(TracingError, match=r"x if c else y.*tracer.cond"), lm.trace(PROMPT):
        lm.model.layers[1].output = 0 if lm.model.layers[0].output.sum() > 0 else 1
    with pytest.raises(TracingError, match="tracer.cond"):
        exec("with lm.trace(PROMPT):\n    if lm.model.layers[0].output.sum() > 0:\n        pass\n",
             {"lm": lm, "PROMPT": PROMPT})
    assert sys.gettrace() is None


def test_for_over_a_traced_list_of_known_length(lm):
    with lm.session() as session:
        numbers = nd.list()
        [numbers.append([k]) for k in range(3)]
        assert len(numbers) == 3
        copied = nd.list().save()
        with session.iter(numbers) as item:  # nnsight 0.4's Iterator over a traced list
            copied.append(item)
        sums = nd.list().save()
        for number in numbers:  # a Python `for` over the traced list
            with lm.trace(PROMPT):
                sums.append(lm.model.layers[0].output.sum() * number[0])
    assert copied == [[0], [1], [2]]
    total = layer0_sum(lm)
    assert torch.allclose(torch.stack(sums), torch.tensor([0.0, total, 2 * total]), atol=1e-5)


def test_a_traced_list_of_unknown_length_is_refused(lm):
    with pytest.raises(TracingError, match="known while recording"), lm.session():
        numbers = nd.list(1, 2)
        with lm.trace(PROMPT) as tracer:
            with tracer.cond(lm.model.layers[0].output.sum() > 0):
                numbers.append(3)  # under a condition: the length is no longer known
        for _ in numbers:
            pass
    with pytest.raises(TracingError, match="length of a traced value is unknown"), lm.trace(PROMPT):
        len(lm.model.layers[0].output)


def _interpreters() -> list[str]:
    """This interpreter, and CPython 3.10-3.13 where this machine has them (pyenv or PATH)."""
    import glob
    import shutil

    found = [sys.executable]
    for minor in (10, 11, 12, 13):
        if sys.version_info[:2] == (3, minor):
            continue
        candidates = [shutil.which(f"python3.{minor}")] + sorted(
            glob.glob(os.path.expanduser(f"~/.pyenv/versions/3.{minor}.*/bin/python")))
        for candidate in candidates:
            if candidate and subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0:
                found.append(candidate)
                break
    return found


@pytest.mark.parametrize("python", _interpreters())
def test_the_line_tracer_works_on_each_python(python):
    """The mechanics (line events, frame jumps, locals written back) differ between CPython 3.10 and
    3.13; tests/control_flow_check runs the real control_flow module on each interpreter found, torch-free,
    and compares every recorded branch with plain Python's decision."""
    script = os.path.join(os.path.dirname(__file__), "control_flow_check", "run.py")
    done = subprocess.run([python, script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stdout + done.stderr
