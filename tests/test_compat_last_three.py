"""nnsight 0.4's last three behaviours (issue 24, part 1), each against plain PyTorch, locally and on
a LocalCluster (a 4-layer tiny Llama in 2 shards: layers 0-1 on shard 0, layers 2-3 on shard 1).

- ``hidden.retain_grad()`` on a traced value: after the trace the saved value's ``.grad`` is the
  gradient a plain forward hook's ``retain_grad()`` keeps; on a parameter (a copy) it is refused;
- ``envoy.output.stop()`` stops the run when that module's value is reached: a later module's save,
  even one written before the stop line, never runs and raises ``ValueError`` (``tracer.stop()``
  keeps its line semantics);
- iterating an item of a traced list of lists in a session (``for item in li: for x in item:``, and
  nnsight 0.4's nested ``session.iter``) gives what plain Python gives; a session without any trace
  runs its own code locally (remotely it is refused by name: shards run passes of the model).
"""
from __future__ import annotations

import dask
import pytest
import torch

import nnsight_dask as nd
from nnsight_dask.errors import ForbiddenOperationError, GraphValidationError, UnsavedValueError

PROMPT = "The Eiffel Tower is in the city of"
NAME = "last-three"


@pytest.fixture(scope="module")
def remote(client, model_dir):
    with dask.config.set({"nnsight-dask.verbose": False}):
        nd.serve(client, model_dir, shards=2, name=NAME)
        yield nd.RemoteModel(client, NAME)


@pytest.fixture(scope="module", params=["local", "remote"])
def model(request, local):
    """The same tiny Llama, locally and in 2 shards (compared with the local model's own module)."""
    return local if request.param == "local" else request.getfixturevalue("remote")


def plain_run(lm, hooks=(), backward=False):
    """Plain PyTorch: the local model's forward on ``PROMPT`` with forward hooks ``(path, fn)``; with
    ``backward``, then backward from the last position's top logit."""
    module = lm._module
    handles = [module.get_submodule(path).register_forward_hook(fn) for path, fn in hooks]
    try:
        with torch.enable_grad() if backward else torch.no_grad():
            logits = module(**lm.tokenizer([PROMPT], return_tensors="pt")).logits
            if backward:
                logits[:, -1].max().backward()
    finally:
        for handle in handles:
            handle.remove()
        module.zero_grad(set_to_none=True)
    return logits


#: On a shard's worker: the plain forward hooks counting its decoder layers' calls, by shard.
_COUNTERS: dict[int, tuple[list, list]] = {}


def _count_layer_calls(index: int, start: bool) -> int:
    """Runs on shard ``index``'s worker: hook its decoder layers (``start``), or unhook them and
    return how many calls they saw."""
    from nnsight_dask.worker import registry

    if start:
        calls: list[int] = []
        layers = registry.lookup(NAME, index).server.runner.layers
        _COUNTERS[index] = ([layer.register_forward_hook(lambda *_: calls.append(1)) for layer in layers], calls)
        return 0
    handles, calls = _COUNTERS.pop(index)
    for handle in handles:
        handle.remove()
    return len(calls)


def shard_layer_calls(client, start):
    """Start counting (``start``), or the number of decoder layer calls each shard made since."""
    record = nd.deployments(client)[NAME]
    return [client.run(_count_layer_calls, s.index, start, workers=[s.worker])[s.worker] for s in record.shards]


# -- retain_grad ------------------------------------------------------------------------------------------
def test_retain_grad_keeps_the_gradient_a_plain_hook_keeps(model, local):
    kept = {}

    def keep(_module, _args, output):
        output.retain_grad()
        kept["h"] = output

    plain_run(local, [("model.layers.1", keep)], backward=True)
    with model.trace(PROMPT):
        hidden = model.model.layers[1].output.save()
        hidden.retain_grad()
        model.output.logits[:, -1].max().backward()
    assert isinstance(hidden, torch.Tensor)
    assert torch.allclose(hidden, kept["h"], atol=1e-5)
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    assert torch.allclose(hidden.grad, kept["h"].grad, atol=1e-6)


def test_retain_grad_of_a_parameter_is_refused(model):
    with pytest.raises(ForbiddenOperationError, match="copies"), model.trace(PROMPT):
        model.lm_head.weight.retain_grad()


# -- envoy.output.stop() ------------------------------------------------------------------------------------
def test_stop_on_a_value_stops_where_that_module_runs(model, local, client):
    seen, ran = {}, []
    plain_run(local, [("model.layers.0", lambda m, a, o: seen.__setitem__("h0", o.clone()))])
    if model is not local:
        shard_layer_calls(client, start=True)
    handle = local._module.model.layers[1].register_forward_hook(lambda m, a, o: ran.append(True))
    try:
        with model.trace(PROMPT):
            later = model.model.layers[2].output.save()  # written before the stop, computed after it
            h0 = model.model.layers[0].output.save()
            model.model.layers[0].output.stop()
    finally:
        handle.remove()
    assert torch.allclose(h0, seen["h0"], atol=1e-6)
    with pytest.raises(ValueError, match="never computed: the run stopped") as info:
        _ = later.value
    assert isinstance(info.value, UnsavedValueError) and "test_compat_last_three.py" in str(info.value)
    if model is local:
        assert not ran, "the run should stop after layer 0"
    else:  # on the shards' own layers: shard 0 ran only layer 0, shard 1 (layers 2-3) nothing
        assert shard_layer_calls(client, start=False) == [1, 0]


def test_stop_on_a_later_shards_value(model, local):
    seen = {}
    plain_run(local, [("model.layers.0", lambda m, a, o: seen.__setitem__("h0", o.clone())),
                      ("model.layers.2", lambda m, a, o: seen.__setitem__("h2", o.clone()))])
    with model.trace(PROMPT):
        last = model.model.layers[3].output.save()
        h0 = model.model.layers[0].output.save()
        h2 = model.model.layers[2].output.save()
        model.model.layers[2].output.stop()
        logits = model.output.logits.save()
    assert torch.allclose(h0, seen["h0"], atol=1e-6) and torch.allclose(h2, seen["h2"], atol=1e-5)
    for never in (last, logits):
        with pytest.raises(ValueError, match="never computed"):
            _ = never.value


def test_tracer_stop_keeps_its_line_semantics(model, local):
    seen = {}
    plain_run(local, [("model.layers.2", lambda m, a, o: seen.__setitem__("h2", o.clone()))])
    with model.trace(PROMPT) as tracer:
        h2 = model.model.layers[2].output.save()  # written before the stop line: it runs
        tracer.stop()
        after = model.model.layers[3].output.save()
    assert torch.allclose(h2, seen["h2"], atol=1e-5)
    with pytest.raises(ValueError, match="never computed"):
        _ = after.value


# -- a traced list of lists in a session ------------------------------------------------------------------
def record_the_issue_snippet():
    """Issue 24's snippet, as written, inside the caller's session: the saved list it fills."""
    li = nd.list()
    [li.append([n]) for n in range(3)]
    li2 = nd.list().save()
    for item in li:
        for x in item:
            li2.append(x)
    return li2


def test_for_over_an_item_of_a_traced_list_of_lists(model):
    with model.session():
        li2 = record_the_issue_snippet()
        with model.trace(PROMPT):
            h = model.model.layers[0].output[:, -1].sum().save()
    expected = []
    for item in [[n] for n in range(3)]:
        for x in item:
            expected.append(x)
    assert li2 == expected == [0, 1, 2]
    assert isinstance(h, torch.Tensor)


def test_nested_session_iter_over_a_traced_list_of_lists(model):
    with model.session() as session:
        li = nd.list()
        [li.append([n, 10 * n]) for n in range(3)]
        li2 = nd.list().save()
        with session.iter(li) as item:
            with session.iter(item) as x:
                li2.append(x)
        with model.trace(PROMPT):
            model.model.layers[0].output.save()
    assert li2 == [0, 0, 1, 10, 2, 20]


def test_an_item_changed_after_it_went_in_is_not_iterated_with_a_stale_length(local):
    with pytest.raises(Exception, match="known while recording|cannot be unpacked"), local.session():
        inner = nd.list(1)
        outer = nd.list()
        outer.append(inner)
        with local.trace(PROMPT) as tracer:
            with tracer.cond(local.model.layers[0].output.sum() > 0):
                inner.append(2)  # under a condition: the item's length is unknown now
        for item in outer:
            for _ in item:
                pass


def test_the_snippet_in_a_session_without_a_trace(local):
    """nnsight 0.4 runs a session's own code even when it holds no trace; locally so do we."""
    with local.session():
        li2 = record_the_issue_snippet()
    assert li2 == [0, 1, 2]


def test_a_remote_session_without_a_trace_is_refused_by_name(remote):
    """The shards run passes of the model; a session with none is refused before it is sent."""
    with pytest.raises(GraphValidationError, match="no passes .* session without a trace runs only locally"), \
            remote.session():
        li2 = nd.list().save()
        li2.append(1)
