"""Envoy: a module of the model as seen from a trace (``lm.model.layers[5].mlp``).

Reading ``.output`` / ``.input`` / ``.inputs`` records a getter, assigning them records a setter,
calling the envoy records a call of the module. Outside a trace an envoy is just a view of the
module tree (``print(lm)``, attribute access).
"""
from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

import torch

from ..errors import (
    ForbiddenOperationError,
    ModuleIndexError,
    ModuleNotFoundInModelError,
    TracingError,
)
from ..graph.node import HOOKED_CALL, Kind, display_path

if TYPE_CHECKING:
    from .proxy import Proxy
    from .recorder import Recorder
    from .traceable import Traceable

_ACCESS = ("output", "input", "inputs")


class Envoy:
    """Proxy for one module. ``_steps`` marks a view from ``.all()`` / ``.iter[...]``: the generation
    steps ``(start, stop, step)`` its reads apply at. ``.next()`` state lives in the active recorder
    (so it ends with the trace), keyed by module path."""

    __slots__ = ("_block", "_children", "_module", "_owner", "_path", "_steps")

    def __init__(self, module: torch.nn.Module, path: str, owner: Traceable,
                 steps: tuple[int, int | None, int] | None = None) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_steps", steps)
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "_block", None)

    # -- tree ---------------------------------------------------------------------------------------
    def _child(self, name: str) -> Envoy:
        child = self._children.get(name)
        if child is None:
            path = f"{self._path}.{name}" if self._path else name
            child = Envoy(self._module._modules[name], path, self._owner)  # type: ignore[arg-type]
            self._children[name] = child
        return child

    def __getattr__(self, name: str) -> Any:
        module = self._module
        if name in module._modules and module._modules[name] is not None:
            return self._child(name)
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            attr = getattr(module, name)
        except AttributeError:
            raise self._unknown(name) from None
        if isinstance(attr, torch.Tensor):
            recorder = self._owner.active_recorder()
            if recorder is not None:
                return recorder.add(Kind.MODULE_ATTR, target=name, module=self._path)
        return attr

    def _unknown(self, name: str) -> ModuleNotFoundInModelError:
        choices = [n for n in self._module._modules] + ["output", "input", "inputs"]
        close = difflib.get_close_matches(name, choices, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return ModuleNotFoundInModelError(
            f"{display_path(self._path) if self._path else 'the model'} ({type(self._module).__name__}) has no "
            f"submodule or attribute {name!r}.{hint} Submodules: {', '.join(self._module._modules) or 'none'}",
            module=self._path, attribute=name)

    def __getitem__(self, key: int | str | slice) -> Any:
        module = self._module
        names = list(module._modules)
        if isinstance(key, slice):
            return [self._child(names[i]) for i in range(*key.indices(len(names)))]
        if isinstance(key, str):
            if key not in module._modules:
                raise self._unknown(key)
            return self._child(key)
        if not isinstance(key, int):
            raise TypeError(f"{display_path(self._path)} is indexed by int, str or slice, not {type(key).__name__}")
        n = len(names)
        if not -n <= key < n:
            raise ModuleIndexError(
                f"{display_path(self._path)}[{key}] is out of range: {display_path(self._path)} has {n} "
                f"entries (valid indices 0..{n - 1}, or -{n}..-1)", module=self._path, index=key)
        return self._child(names[key % n])

    def __len__(self) -> int:
        return len(self._module._modules)

    def __iter__(self) -> Any:
        return (self._child(name) for name in self._module._modules)

    def __repr__(self) -> str:
        return repr(self._module)

    @property
    def path(self) -> str:
        """Dotted module path as in ``named_modules()`` (``"model.layers.5.mlp"``)."""
        return self._path

    # -- views -----------------------------------------------------------------------------------
    def next(self, step: int = 1) -> Envoy:
        """Move this module (and its submodules) ``step`` calls on, for the rest of the trace; returns
        the envoy, so ``layer.next().output`` chains (nnsight's ``.next()``; generation: the next step)."""
        if step < 0:
            raise TracingError(f"{display_path(self._path)}.next({step}): steps move forward only", module=self._path)
        self._recorder("next()").advance(self._path, step)
        return self

    def all(self) -> Envoy:
        """This module at every generation step: reads through it give one value a step. As
        ``with envoy.all():`` everything recorded inside applies at every step (like ``tracer.all()``)."""
        return Envoy(self._module, self._path, self._owner, (0, None, 1))

    @property
    def iter(self) -> _EnvoyIter:
        """``with envoy.iter[a:b]:`` applies the block at generation steps a..b-1 (``iter[k]``: step k);
        ``envoy.iter[a:b].output`` reads the output at each of those steps."""
        return _EnvoyIter(self)

    def __enter__(self) -> Envoy:
        if self._steps is None:
            raise TracingError(
                f"{display_path(self._path) or 'the model'} is not a context manager; use "
                f"`with {display_path(self._path) or 'model'}.all():` or `with ....iter[a:b]:`", module=self._path)
        block = self._recorder("all()" if self._steps == (0, None, 1) else "iter[...]").iteration_block(*self._steps)
        block.__enter__()
        object.__setattr__(self, "_block", block)
        return self

    def __exit__(self, *exc: object) -> None:
        block = self._block
        object.__setattr__(self, "_block", None)
        if block is not None:
            block.__exit__(*exc)

    # -- access points --------------------------------------------------------------------------
    def _recorder(self, what: str) -> Recorder:
        recorder = self._owner.active_recorder()
        if recorder is None:
            raise TracingError(
                f"{display_path(self._path)}.{what} can only be used inside `with model.trace(...)` "
                "(or generate/scan/session)", module=self._path)
        return recorder

    def _iteration(self, recorder: Recorder) -> int | None:
        """The iteration block of a read through ``.all()`` / ``.iter[...]`` (an open block wins)."""
        if self._steps is None or recorder.iteration is not None:
            return None
        return recorder.steps_iteration(*self._steps)

    def _access(self, kind: str, access: str, value: Any = None) -> Proxy:
        recorder = self._recorder(access)
        args = () if kind == Kind.GETTER else (value,)
        path = self._path
        # (the common case, no `.next()` and no `.all()`/`.iter`, without two more calls per access)
        return recorder.add(kind, args, module=path, access=access,
                            call=recorder.call_index(path) if recorder.envoy_steps else 0,
                            iteration=None if self._steps is None else self._iteration(recorder))

    @property
    def output(self) -> Proxy:
        """The module's output (a tuple for modules that return tuples)."""
        return self._access(Kind.GETTER, "output")

    @property
    def input(self) -> Proxy:
        """The module's first positional argument."""
        return self._access(Kind.GETTER, "input")

    @property
    def inputs(self) -> Proxy:
        """The module's ``(args, kwargs)``."""
        return self._access(Kind.GETTER, "inputs")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _ACCESS:
            self._access(Kind.SETTER, name, value)
            return
        if name in Envoy.__slots__:
            object.__setattr__(self, name, value)
            return
        if self._owner.active_recorder() is not None:
            raise ForbiddenOperationError(
                f"{display_path(self._path)}.{name} cannot be set inside a trace: a trace may not change the "
                "model (its weights are shared). Write to .output, .input or .inputs instead, or change a "
                "weight's copy in place (w = lm.lm_head.weight; w[:] = 0 changes only the copy)",
                module=self._path, attribute=name)
        setattr(self._module, name, value)

    def skip(self, value: Any) -> None:
        """Do not run this module; use ``value`` as its output."""
        recorder = self._recorder("skip()")
        if recorder.invoke is not None and len(recorder.graph.passes[recorder.pass_index].invokes) > 1:
            raise TracingError("skip() applies to the whole batch; call it outside the invokes")
        recorder.add(Kind.SKIP, (value,), module=self._path, call=recorder.call_index(self._path),
                     iteration=self._iteration(recorder))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the module on traced values (e.g. the logit lens, ``lm.lm_head(lm.model.norm(h))``).

        By default the call runs without the trace's hooks: interventions on the module and its
        submodules do not apply to it, and it does not count as a call of them. ``hook=True``
        (nnsight's spelling) runs it with the hooks live: it counts as the next call of the module and
        its submodules (call 0 for a module the model itself never calls, such as one attached under
        an envoy; else reach it with ``.next()``), and their interventions apply to it.
        """
        hook = kwargs.pop("hook", False)
        recorder = self._owner.active_recorder()
        if recorder is None:
            return self._module(*args, **kwargs)
        if not isinstance(hook, bool):
            raise TracingError(f"{display_path(self._path)}(..., hook=...) takes True or False, not {hook!r}",
                               module=self._path)
        return recorder.add(Kind.MODULE_CALL, args, kwargs, module=self._path, access=HOOKED_CALL if hook else None)


class _EnvoyIter:
    """``envoy.iter[...]``: a view of the envoy at the selected generation steps."""

    __slots__ = ("_envoy",)

    def __init__(self, envoy: Envoy) -> None:
        self._envoy = envoy

    def __getitem__(self, key: int | slice) -> Envoy:
        envoy = self._envoy
        if isinstance(key, bool) or not isinstance(key, (int, slice)):
            raise TracingError(f"{display_path(envoy._path)}.iter takes an int or a slice, not {type(key).__name__}",
                               module=envoy._path)
        if isinstance(key, int):
            steps: tuple[int, int | None, int] = (key, key + 1, 1)
        else:
            steps = (key.start or 0, key.stop, key.step or 1)
        if steps[0] < 0 or (steps[1] is not None and steps[1] < 0) or steps[2] <= 0:
            raise TracingError("generation steps are counted from 0 and go forward; negative steps are not "
                               f"supported (got {display_path(envoy._path)}.iter[{key}])", module=envoy._path)
        return Envoy(envoy._module, envoy._path, envoy._owner, steps)
