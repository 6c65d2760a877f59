"""The module hooks of one forward pass: one pre-hook and one hook per module some experiment's
graph touches, handing each call to every experiment (:class:`Seat`) that has events on it.

An experiment's seat in a pass is its interleaver and, in a co-tenant pass, its
:class:`~.batching.Window` of the batch: its nodes see only their rows and columns, and an error
(or its ``stop()``) halts that experiment only (:attr:`Seat.halted`) while the pass goes on for
the others. Alone (no window) an error leaves the model at once.
"""
from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ..errors import ModuleNotFoundInModelError
from ..graph.graph import InterventionGraph
from ..graph.node import display_path
from .batching import Window, narrow_window, splice_window
from .executor import Quiet
from .interleaver import NOT_SET, Interleaver, ModuleCalls


class Seat:
    """One experiment's place in one forward pass: its ``interleaver`` and ``window`` (None: alone)."""

    __slots__ = ("interleaver", "window", "halted")

    def __init__(self, interleaver: Interleaver, window: Window | None = None) -> None:
        self.interleaver = interleaver
        self.window = window
        #: Why this experiment left the pass (its error, or StopForward for its ``stop()``); its hooks
        #: do nothing from then on.
        self.halted: BaseException | None = None

    def halt(self, error: BaseException) -> None:
        """The experiment leaves the pass (the first reason is kept)."""
        if self.halted is None:
            self.halted = error

    def run(self, step: Callable[[], Any]) -> None:
        """Run ``step`` (free nodes before the forward) for this experiment: an error halts it only."""
        if self.halted is not None:
            return
        try:
            step()
        except Exception as exc:  # StopForward included: its stop() ends only its part
            self.halted = exc

    def fire(self, keys: list[Any], current: Any, phase: str) -> Any:
        """The interleaver's :meth:`~.Interleaver.fire` on this experiment's window of ``current``."""
        window = self.window
        if window is None:
            return self.interleaver.fire(keys, current, phase)
        view = narrow_window(current, window)
        try:
            new = self.interleaver.fire(keys, view, phase)
            return current if new is view else splice_window(current, new, window)
        except Exception as exc:
            self.halted = exc
            return current

    def enter(self, path: str, calls: ModuleCalls, current: tuple[Any, Any]) -> tuple[Any, Any]:
        """A call of module ``path`` begins with ``current`` = (args, kwargs): count it, run the
        experiment's skips and input events of that call; the (maybe replaced) arguments."""
        if self.halted is not None:
            calls.current = None
            return current
        call = calls.count
        calls.count += 1
        calls.current = call
        plan = self.interleaver.plan
        if path in plan.skip_paths:
            skips = plan.skips.get((path, call))
            if skips is not None:
                calls.skip_value = self.interleaver.fire(skips, None, "in")
        if path not in plan.input_paths:
            return current
        keys = plan.events.get((path, "in", call))
        return current if keys is None else self.fire(keys, current, "in")

    def leave(self, path: str, calls: ModuleCalls, output: Any) -> Any:
        """The call of module ``path`` returned ``output``: run the output events; the (maybe replaced) output."""
        call = calls.current
        if call is None or self.halted is not None:
            return output
        interleaver = self.interleaver
        keys = interleaver.plan.events.get((path, "out", call))
        if keys is None:
            return output
        return interleaver.fire(keys, output, "out") if self.window is None else self.fire(keys, output, "out")


def hook_modules(seats: Sequence[Seat], quiet: Quiet) -> list[Any]:
    """Hook every module some seat's pass has events on (one pre-hook and one hook per module,
    whatever the number of seats); returns the handles to remove afterwards.

    Calls the graph makes itself (``quiet``) are no model events for anyone.
    """
    watchers: dict[str, list[Seat]] = {}
    modules: dict[str, torch.nn.Module] = {}
    for seat in seats:
        for path in seat.interleaver.plan.module_paths:
            watchers.setdefault(path, []).append(seat)
            modules[path] = seat.interleaver.modules[path]
    handles: list[Any] = []
    global_hooks = _any_global_module_hooks()
    for path, watching in watchers.items():
        handles.extend(_hook_module(modules[path], path, watching, quiet, global_hooks))
    return handles


def _hook_module(module: torch.nn.Module, path: str, seats: list[Seat], quiet: Quiet,
                 global_hooks: bool) -> list[Any]:
    pairs: list[tuple[Seat, ModuleCalls]] = []
    skipped = False
    for seat in seats:  # (a loop: no generator made per module and trace)
        pairs.append((seat, seat.interleaver.calls(path)))
        skipped = skipped or path in seat.interleaver.plan.skip_paths
    if not skipped and not global_hooks and _runs_without_hooks(module):
        return [_wrapped_forward(module, path, pairs, quiet)]
    calls = [state for _seat, state in pairs]

    def pre_hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if quiet.depth:
            for state in calls:
                state.current = None
            return None
        current = (args, kwargs)
        for seat, state in pairs:
            current = seat.enter(path, state, current)
        return None if current[0] is args and current[1] is kwargs else current

    def hook(_module: torch.nn.Module, _args: tuple[Any, ...], _kwargs: dict[str, Any], output: Any) -> Any:
        current = output
        for seat, state in pairs:
            current = seat.leave(path, state, current)
        return None if current is output else current

    handles = [module.register_forward_pre_hook(pre_hook, with_kwargs=True),
               module.register_forward_hook(hook, with_kwargs=True)]
    if skipped:
        handles.append(_skipping_forward(module, calls))
    return handles


def _runs_without_hooks(module: torch.nn.Module) -> bool:
    """Whether a call of ``module`` now runs no hook of its own (with no global hooks either, torch
    then calls ``module.forward`` straight) and ``forward`` is the class's own (no instance attribute:
    accelerate's, another path's)."""
    return not (module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
                or module._backward_hooks or "forward" in module.__dict__)


def _any_global_module_hooks() -> bool:
    """Whether hooks for every module are registered (``torch.nn.modules.module.register_module_forward_hook``
    and its siblings; torch keeps them in private module globals, read here only)."""
    return any(getattr(_torch_module, name, None) for name in _GLOBAL_HOOKS)


_torch_module = sys.modules[torch.nn.Module.__module__]
_GLOBAL_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks",
                 "_global_backward_hooks")


def _wrapped_forward(module: torch.nn.Module, path: str, pairs: list[tuple[Seat, ModuleCalls]],
                     quiet: Quiet) -> _InstanceForward:
    """Our hooks run around ``module.forward`` instead of as torch hooks, for a module that has no
    hooks of anyone else: the same calls, in the same order, without torch's hook machinery (about
    15 us a module call on a 2-core VM, more than the model's own work in a small layer), and one
    function made per module and trace instead of a pre-hook and a hook.

    Where others' hooks exist (or appear: transformers installs output-capturing hooks at a first
    ``output_hidden_states=True`` call), the order is what torch hooks registered now would give:
    ours first after the forward, before hooks added later.
    """
    original: Callable[..., Any] = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if quiet.depth:  # the graph's own call of this module: no event for anyone
            for _seat, state in pairs:
                state.current = None
            return original(*args, **kwargs)
        current = (args, kwargs)
        for seat, state in pairs:
            current = seat.enter(path, state, current)
        output = original(*current[0], **current[1])
        for seat, state in pairs:
            output = seat.leave(path, state, output)
        return output

    forward.__wrapped__ = original  # type: ignore[attr-defined]  # inspect.signature(module.forward) as before
    return _InstanceForward(module, forward)


def _skipping_forward(module: torch.nn.Module, calls: list[ModuleCalls]) -> _InstanceForward:
    """``module.forward`` for a module with skips: a call that a skip node covered returns the skip's
    value instead of running."""
    original: Callable[..., Any] = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        for state in calls:
            if state.skip_value is not NOT_SET:
                value, state.skip_value = state.skip_value, NOT_SET
                return value
        return original(*args, **kwargs)

    return _InstanceForward(module, forward)


class _InstanceForward:
    """``forward`` is ``module.forward`` (an instance attribute) while hooked; :meth:`remove` puts back
    what was there: the class's forward, or an instance attribute of someone else's (accelerate's)."""

    __slots__ = ("module", "forward", "previous")

    def __init__(self, module: torch.nn.Module, forward: Callable[..., Any]) -> None:
        self.module = module
        self.forward = forward
        self.previous = module.__dict__.get("forward")
        module.__dict__["forward"] = forward

    def remove(self) -> None:
        attributes = self.module.__dict__
        if attributes.get("forward") is self.forward:
            if self.previous is None:
                del attributes["forward"]
            else:
                attributes["forward"] = self.previous


_BY_PATH: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.nn.Module]] = weakref.WeakKeyDictionary()


def graph_modules(model: torch.nn.Module, graph: InterventionGraph,
                  paths: Iterable[str] | None = None) -> dict[str, torch.nn.Module]:
    """The model's modules by path, found once per model: the graph's (``paths``: only those), with
    a clear error naming the user's line for a path the model does not have."""
    found = _BY_PATH.get(model)
    if found is None:  # (setdefault would make a weak reference at every call)
        found = _BY_PATH[model] = {}
    for path in graph.module_paths() if paths is None else paths:
        if path not in found:
            try:
                found[path] = model.get_submodule(path)
            except AttributeError:
                node = next(n for n in graph.nodes if n.module == path)
                raise ModuleNotFoundInModelError(
                    f"{node.location or '<graph>'}: the model has no module {display_path(path)!r}",
                    module=path, location=node.location) from None
    return found
