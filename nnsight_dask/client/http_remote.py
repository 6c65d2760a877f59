"""``nd.RemoteModel(url, name, api_key=...)``: a deployment reached through the HTTP gateway.

The same tracing as over a Dask ``Client`` (the common part is :mod:`.remote_model`); only the
transport differs: the graph goes to the gateway as JSON, the results come back in the JSON of
:mod:`nnsight_dask.http_wire`, and persisted saves open as lazy tensors read through the gateway (or straight
from the store with ``store_access="direct"``), so a slice fetches only the chunks it needs.

While a trace waits, the client asks the gateway for its status at least every
:data:`POLL_SECONDS` and submits with a keepalive of :data:`KEEPALIVE_SECONDS`: a client that dies
stops asking, and the gateway cancels its experiment on the shards. Interrupting the wait (Ctrl-C)
cancels it at once.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ..backends.base import Backend, RunResult
from ..errors import TracingError
from ..graph.graph import InterventionGraph
from ..http_wire import FINAL, decode_results, error_from_json
from ..storage.results import TensorRef
from .futures import ExperimentFuture
from .http_api import GatewayError, GatewaySession
from .progress import ExperimentProgress
from .remote_model import RemoteModel

#: Longest single status request (the gateway answers as soon as the experiment ends).
POLL_SECONDS = 10.0
#: Status requests of a background experiment are shorter, so that ``future.cancel()`` acts soon.
CANCEL_POLL_SECONDS = 1.0
#: Seconds the gateway keeps an experiment nobody asks about (a client that died) before cancelling it.
KEEPALIVE_SECONDS = 60.0
#: Where persisted saves are read: through the gateway, or straight from the store.
STORE_ACCESS = ("gateway", "direct")


class HttpBackend(Backend):
    """Runs graphs on ``model``'s deployment through the gateway of its session; scans run on
    ``scanner``, in this process."""

    def __init__(self, model: HttpRemoteModel, scanner: Backend) -> None:
        self.model = model
        self.session = model._gateway
        self.name = model.model_id
        self.scanner = scanner

    def scan(self, graph: InterventionGraph) -> RunResult:
        return self.scanner.scan(graph)

    def run(self, graph: InterventionGraph, **options: Any) -> RunResult:
        progress = ExperimentProgress(self.name, options.pop("verbose", None))
        try:
            return self._run(graph, threading.Event(), progress if progress.enabled else None, POLL_SECONDS)
        finally:
            progress.close()

    def submit(self, graph: InterventionGraph, deliver: Callable[[RunResult], None] | None = None,
               **options: Any) -> ExperimentFuture:
        """The experiment running in the background; ``result()`` is its :class:`RunResult`."""
        return ExperimentFuture(lambda cancelled: self._run(graph, cancelled, None, CANCEL_POLL_SECONDS), deliver,
                                cancel_wait=30.0)

    def _run(self, graph: InterventionGraph, cancelled: threading.Event,
             on_status: Callable[[str, dict[str, Any]], None] | None, poll: float) -> RunResult:
        """Submit, wait (cancelling on the gateway if the wait is interrupted or ``cancelled`` is set),
        fetch. Raises what a Dask client would for a failed or cancelled experiment."""
        body = {"deployment": self.name, "graph": graph.to_json(), "keepalive": KEEPALIVE_SECONDS}
        experiment = self.session.call("POST", "/experiments", body=body)["experiment"]
        try:
            status = self._wait(experiment, cancelled, on_status, poll)
        except BaseException:  # interrupted (Ctrl-C), cancelled, or the gateway unreachable: stop it there
            with contextlib.suppress(GatewayError):
                self.session.call("DELETE", f"/experiments/{experiment}")
            raise
        if status["status"] != "COMPLETED":
            raise error_from_json(status.get("error") or {"type": "ExperimentFailedError",
                                                          "message": f"experiment {experiment} {status['status']}"})
        # the final status carries the result (?result=1); a gateway that no longer keeps it says so at /result
        document = status.get("result")
        if document is None:
            document = self.session.call("GET", f"/experiments/{experiment}/result")
        saves, logs = decode_results(document, lambda ref: self._open(experiment, ref))
        return RunResult(saves=saves, logs=logs)

    def _wait(self, experiment: str, cancelled: threading.Event,
              on_status: Callable[[str, dict[str, Any]], None] | None, poll: float) -> dict[str, Any]:
        while True:
            status = self.session.call("GET", f"/experiments/{experiment}", params={"wait": poll, "result": 1},
                                       timeout=poll + self.session.timeout)
            if status["status"] in FINAL:
                if on_status is not None and status["status"] == "COMPLETED":
                    on_status("completed", {"experiment": experiment})
                return dict(status)
            if cancelled.is_set():
                raise concurrent.futures.CancelledError(f"experiment {experiment} was cancelled")
            if on_status is not None:
                if status["status"] == "QUEUED":
                    on_status("queued", {"experiment": experiment, "position": status.get("position", 0)})
                elif "stages" in status:
                    on_status("running", {"stage": int(status.get("stage", 1)) - 1, "stages": status["stages"]})

    def _open(self, experiment: str, ref: Mapping[str, Any]) -> Any:
        shape, dtype = tuple(ref["shape"]), str(ref["dtype"])
        if self.model._store_access == "direct":
            return TensorRef(str(ref["url"]), str(ref["path"]), shape, dtype).open()
        return TensorRef(self.session.store_url(experiment), str(ref["path"]), shape, dtype,
                         {"headers": dict(self.session.headers)}).open()


class HttpRemoteModel(RemoteModel):
    """A :class:`RemoteModel` whose transport is the gateway (built by ``RemoteModel(url, name, ...)``).

    ``api_key`` (default ``NNSIGHT_DASK_API_KEY``) identifies the user; ``store_access`` says where
    persisted saves are read (see the module docstring); ``policy`` is the deployment's policy as the
    gateway reports it (the shards enforce it).
    """

    @classmethod
    def reaches(cls, target: Any) -> bool:
        return target is None or isinstance(target, str)

    def __init__(self, url: str | None = None, name: str | None = None, *, api_key: str | None = None,
                 store_access: str = "gateway", timeout: float = 60.0) -> None:
        if not name:
            raise TracingError("RemoteModel needs the deployment's name: nd.RemoteModel(url, 'name', api_key=...)")
        if store_access not in STORE_ACCESS:
            raise TracingError(f"store_access= is one of {STORE_ACCESS}, not {store_access!r}")
        session = GatewaySession(url, api_key, timeout)
        description = session.call("GET", f"/deployments/{name}")
        super().__init__(description, name)
        object.__setattr__(self, "_gateway", session)
        object.__setattr__(self, "_store_access", store_access)
        object.__setattr__(self, "policy", description.get("policy"))

    def _remote_backend(self, remote: Any) -> Backend:
        if remote is not True:
            raise TracingError("a RemoteModel reached through a gateway runs with remote=True only")
        return HttpBackend(self, self._scanner())
