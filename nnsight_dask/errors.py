"""One root error for the project, with subclasses that also inherit the builtin a caller would catch.

Errors carry their data in fields and rebuild from them when unpickled, so an error raised on a
Dask worker arrives on the client intact (type, message, user line, module path, remote traceback).
"""
from __future__ import annotations

from typing import Any


class NNsightDaskError(Exception):
    """Root of every error this project raises on purpose."""

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields
        for key, value in fields.items():
            setattr(self, key, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.fields))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[NNsightDaskError], message: str, fields: dict[str, Any]) -> NNsightDaskError:
    return cls(message, **fields)


class TracingError(NNsightDaskError, RuntimeError):
    """Something written inside a ``with model.trace(...)`` block cannot be recorded."""


class ModuleNotFoundInModelError(NNsightDaskError, AttributeError):
    """An envoy path names a module or attribute the model does not have."""


class ModuleIndexError(NNsightDaskError, IndexError):
    """A ``ModuleList`` index is outside the list (e.g. ``layers[40]`` on a 30-layer model)."""


class GraphValidationError(NNsightDaskError, ValueError):
    """An intervention graph is malformed, or would fail, before anything runs."""


class ForbiddenOperationError(GraphValidationError):
    """A graph uses an operation outside the whitelist, or a local-only function, remotely."""


class PolicyError(GraphValidationError):
    """A graph asks for something the deployment's policy does not allow (names the rule and the line)."""


class InterventionError(NNsightDaskError, RuntimeError):
    """An intervention failed while the model ran. Names the user's line and the module path."""


class UnsavedValueError(NNsightDaskError, ValueError):
    """A proxy's value was read after its trace, but the proxy was never ``.save()``-d."""


class ExperimentFailedError(NNsightDaskError, RuntimeError):
    """A remote experiment ended as failed; carries the reason and the remote traceback."""


class DeploymentError(NNsightDaskError, RuntimeError):
    """A deployment cannot be created, found or reached."""


class StorageError(NNsightDaskError, OSError):
    """A Zarr store cannot be written or read as asked."""
