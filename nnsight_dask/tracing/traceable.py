"""What tracers and envoys need of the model wrapper they record for: the :class:`Traceable` protocol.

:class:`~.model.ModuleWrapper` (and so ``nd.NNsight``, ``nd.LanguageModel``, ``nd.RemoteModel``)
implements it. Tracers (:mod:`.tracer`) and envoys (:mod:`.envoy`) name this protocol instead of
importing the wrapper, which itself creates them: so files import one way.
"""
from __future__ import annotations

from typing import Any, Protocol

from ..backends.base import Backend
from .recorder import Recorder


class Traceable(Protocol):
    """A wrapped model, as seen from the tracers and envoys recording on it."""

    @property
    def model_id(self) -> str:
        """The model's name, recorded in the graph (a deployment's name for a remote model)."""

    def active_recorder(self) -> Recorder | None:
        """The innermost recording open on this model in this thread, or ``None``."""

    def open_recording(self, recorder: Recorder) -> None:
        """``recorder`` records what is written on this model (and on ``nd.list()`` etc.) until closed."""

    def close_recording(self, recorder: Recorder) -> None:
        """Undo :meth:`open_recording`."""

    def current_session(self) -> Any:
        """The :class:`~.tracer.Session` open on this model in this thread, or ``None``."""

    def set_current_session(self, session: Any) -> None:
        """Open (a session) or close (``None``) the session of this model in this thread."""

    def encode_invoke(self, inputs: tuple[Any, ...], **kwargs: Any) -> dict[str, Any]:
        """What one invoke's inputs become in the graph (token ids and mask for a language model)."""

    def apply_edits(self, recorder: Recorder) -> None:
        """Copy this model's edits (``model.edit()``) into the pass ``recorder`` just opened."""

    def backend_for(self, remote: Any) -> Backend:
        """Where a run with this ``remote=`` argument goes (``None``/``False``: the local backend)."""
