"""What a remote experiment returns: saved values by name, plus its id and logged lines."""
from __future__ import annotations

from typing import Any


class Results(dict):  # type: ignore[type-arg]
    """``results["h"]`` is the value saved as ``h``; ``.logs`` the lines of ``tracer.log``."""

    def __init__(self, saves: dict[str, Any] | None = None, *, experiment_id: str = "", logs: list[str] | None = None) -> None:
        super().__init__(saves or {})
        self.experiment_id = experiment_id
        self.logs = list(logs or [])

    def __reduce__(self) -> Any:
        return (_rebuild, (dict(self), self.experiment_id, self.logs))

    def __repr__(self) -> str:
        return f"Results({self.experiment_id}: {sorted(self)})"


def _rebuild(saves: dict[str, Any], experiment_id: str, logs: list[str]) -> Results:
    return Results(saves, experiment_id=experiment_id, logs=logs)
