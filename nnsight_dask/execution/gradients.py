"""Gradient nodes: which backward each belongs to, and the tensor hooks that hand them the gradient.

A gradient node belongs to the first ``backward()`` after it in program order (nnsight's rule): its
hook is live only while that backward runs. Backwards run one after another in program order, never
nested: while one runs, only free nodes before it may run (:attr:`GradientHooks.running` tells the
interleaver where to stop).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..errors import ForbiddenOperationError, InterventionError
from ..graph.node import Kind, Node
from .batching import Window, narrow_window, splice_window
from .plan import Key

#: ``fire(keys, gradient, "grad")``: runs the gradient nodes ``keys`` on a gradient, returns it (maybe replaced).
Fire = Callable[[list[Key], Any, str], Any]


class GradientHooks:
    """Hooks gradient nodes on the tensors they read, each live only during its own backward.

    ``backward_of`` maps each gradient node to its backward (None: any backward, e.g. a shard's
    backward stage that the graph did not start); ``values`` tells which nodes already ran, so a
    hook fires once; ``invoke_windows`` are the invokes' rows when a pass has several.

    ``fire`` comes with each :meth:`watch`, not here: the interleaver owns this object, and holding
    its bound method would make every pass a reference cycle, freed only by the garbage collector
    (its values, activations included, with it).
    """

    def __init__(self, backward_of: dict[Key, Key | None], values: dict[Key, Any],
                 invoke_windows: list[Window] | None) -> None:
        self.backward_of = backward_of
        self.values = values
        self.invoke_windows = invoke_windows
        #: The graph's backward node running now (None: none, or one the graph did not start).
        self.running: Key | None = None

    @contextmanager
    def during(self, backward: Key) -> Iterator[None]:
        """While the graph's ``backward`` node runs."""
        outer, self.running = self.running, backward
        try:
            yield
        finally:
            self.running = outer

    def watch(self, node: Node, value: Any, keys: list[Key], fire: Fire) -> None:
        """``node``'s value ``value`` exists: hook the gradient nodes ``keys`` that read its gradient,
        which ``fire`` runs on it."""
        if node.kind == Kind.MODULE_ATTR:
            raise ForbiddenOperationError(
                f"{node.location or '<graph>'}: cannot read or write .grad of {node.describe()}: parameters "
                "read in a trace are copies, detached from the shared model, so no gradient reaches them. "
                "Read the gradient of a module's output or input instead (e.g. lm.lm_head.input.grad)",
                location=node.location, module=node.module, attribute=node.target, node=node.id)
        if not isinstance(value, torch.Tensor) or not value.requires_grad:
            raise InterventionError(
                f"{node.location or '<graph>'}: cannot read or write .grad of {node.describe()}: the value "
                "does not require grad. Gradients exist only for values computed from the model's "
                "parameters while a backward pass runs (call loss.backward() in the trace).",
                location=node.location, module=node.module)
        groups: dict[Key | None, list[Key]] = {}
        for key in keys:
            groups.setdefault(self.backward_of.get(key), []).append(key)
        for backward, group in groups.items():
            self._hook(node, value, group, backward, fire)

    def _hook(self, node: Node, value: torch.Tensor, keys: list[Key], backward: Key | None, fire: Fire) -> None:
        """Hook ``keys`` on ``value``'s gradient, live only while ``backward`` runs and only once."""
        values = self.values

        def live() -> bool:
            running = self.running
            if running is not None and backward is not None and running != backward:
                return False
            return not all(k in values for k in keys)

        base = value._base
        windows = self.invoke_windows
        if windows is not None and node.invoke is not None and node.kind == Kind.GETTER and base is not None \
                and base.requires_grad and base.shape[0] == windows[node.invoke].batch:
            # an invoke's rows are a view the model never uses: watch the whole batch's tensor and
            # hand the invoke its rows of the gradient (and splice a replacement back in)
            window = windows[node.invoke]

            def rows_hook(grad: torch.Tensor) -> Any:
                if not live():
                    return None
                part = narrow_window(grad, window)
                new = fire(keys, part, "grad")
                return None if new is part else splice_window(grad, new, window)

            base.register_hook(rows_hook)
            return

        def hook(grad: torch.Tensor) -> Any:
            if not live():
                return None
            new = fire(keys, grad, "grad")
            return None if new is grad else new

        value.register_hook(hook)
