"""The gateway's HTTP API under ``/v1`` (documented in docs/gateway.md).

Every route but ``/v1/health`` needs ``Authorization: Bearer <key>``. A user sees only their own
experiments: another user's id answers 404, exactly like an id that does not exist, so ids leak
nothing. Errors are JSON: ``{"error": {"type", "message", "fields"}}``.

On the event loop only cheap work runs: headers, a key's hash, a row lookup. A submission is
admitted per user from its headers (:mod:`.admission`: ``429`` before the body is read), its body
is kept up to the limit, then parsed (at a bounded cost, :mod:`.bodies`) and validated in the
validation pool, whose threads users take in turn; other blocking work (the scheduler, result
files, store reads) runs in a second pool shared the same way.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import posixpath
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from tornado import web, websocket

from ...errors import DeploymentError, GraphValidationError, PolicyError
from ...graph.graph import InterventionGraph
from ...http_wire import API, FINAL, error_to_json
from ...limits import check_graph, decode_graph
from ...storage.location import StoreLocation
from .admission import Refused
from .bodies import BodyError, json_values, parse_json
from .core import GatewayCore
from .dispatch import Job, QuotaExceeded
from .keys import User
from .stores import scope_graph

#: Longest ``?wait=`` a status request may block, in seconds.
MAX_WAIT = 60.0
_EXPERIMENT = r"([0-9a-f]{32})"
#: Answers that count against the user's refusal budget (:class:`~.admission.RefusalBudget`).
REFUSALS = frozenset({400, 403, 404, 405, 413, 416, 422})
logger = logging.getLogger(__name__)


class ApiError(web.HTTPError):
    """An answer other than success, with a JSON body naming what went wrong."""

    def __init__(self, code: int, kind: str, message: str, **fields: Any) -> None:
        super().__init__(code)
        self.body = {"type": kind, "message": message, "fields": fields}


@web.stream_request_body
class ApiHandler(web.RequestHandler):
    """Authentication, body size limit and JSON answers, for every route."""

    core: GatewayCore
    user: User

    def initialize(self, core: GatewayCore) -> None:
        self.core = core
        self._body = bytearray()
        self._overflow = False
        self._admitted = False  # holds one of the user's submission slots (see admit)
        self._working = False  # its body is being parsed and validated in the pool

    #: Whether the route needs an API key (all but the health check).
    requires_user = True

    def prepare(self) -> None:
        if self.requires_user:
            user = self.core.keys.authenticate(self.request.headers.get("Authorization"))
            if user is None:
                raise ApiError(401, "Unauthorized", "a valid API key is needed: send 'Authorization: Bearer <key>'")
            self.user = user
        declared = self.request.headers.get("Content-Length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.core.max_body_bytes):
            raise self._too_large()

    def admit(self) -> None:
        """Admit a submission before its body is read (429 over the user's bounds, see :mod:`.admission`);
        released when it is answered or its client leaves."""
        try:
            self.core.admission.begin(self.user.name, self.core.dispatcher.active(self.user.name),
                                      self.user.max_concurrent)
        except Refused as exc:
            kind = "QuotaExceeded" if exc.fields.get("limit") == "max_concurrent" else "RateLimited"
            raise ApiError(429, kind, str(exc), **exc.fields) from None
        self._admitted = True

    def release(self) -> None:
        if self._admitted:
            self._admitted = False
            self.core.admission.end(self.user.name)

    def on_finish(self) -> None:
        self.release()
        if hasattr(self, "user") and self.get_status() in REFUSALS:
            self.core.admission.refusals.spend(self.user.name)

    def on_connection_close(self) -> None:
        super().on_connection_close()  # ends the wait for a body that will not come
        if not self._working:  # a submission being validated releases when it is done
            self.release()

    def data_received(self, chunk: bytes) -> None:
        """Keep the body up to the limit; past it (a chunked body, no declared length) drain and drop
        the rest, so the 413 reaches a client still sending (tornado cuts off past 4x the limit)."""
        if self._finished or self._overflow:
            return
        self._body += chunk
        if len(self._body) > self.core.max_body_bytes:
            self._overflow = True
            self._body.clear()

    def _too_large(self) -> ApiError:
        limit = self.core.max_body_bytes
        return ApiError(413, "PayloadTooLarge", f"the request body is over the gateway's limit of {limit} bytes "
                        f"({limit / 2**20:g} MiB: nnsight-dask.gateway-max-body-bytes)", limit=limit)

    def answer(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None))[1]
        if isinstance(error, ApiError):
            body = error.body
        else:
            body = {"type": "HTTPError", "message": self._reason, "fields": {}}
        if status_code == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="nnsight-dask"')
        retry_after = body["fields"].get("retry_after")
        if status_code == 429 and isinstance(retry_after, (int, float)):
            self.set_header("Retry-After", str(max(1, math.ceil(retry_after))))
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": body}))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if not isinstance(value, ApiError):  # refusals are answers, not server errors
            super().log_exception(typ, value, tb)

    def blocking(self, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        """Run ``fn(*args)`` in the gateway's I/O pool, in the user's turn."""
        return asyncio.wrap_future(self.core.io_pool.submit(self.user.name, fn, *args))

    def own_row(self, experiment: str) -> dict[str, Any]:
        """The user's experiment ``experiment``; 404 when it is not theirs or does not exist."""
        row = self.core.state.get(experiment)
        if row is None or row["user"] != self.user.name:
            raise ApiError(404, "NotFound", f"no experiment {experiment} of user {self.user.name!r}")
        job = self.core.dispatcher.jobs.get(experiment)
        if job is not None:
            job.seen()
        return row

    def status_of(self, row: dict[str, Any]) -> dict[str, Any]:
        job = self.core.dispatcher.jobs.get(row["id"])
        live = {k: v for k, v in (job.event if job is not None else {}).items()
                if k in ("position", "stage", "stages")}
        status = {"experiment": row["id"], "deployment": row["deployment"], "status": row["status"],
                  "submitted": row["submitted"], "started": row["started"], "ended": row["ended"], **live}
        if row["error"]:
            status["error"] = row["error"]
        return status


class Health(ApiHandler):
    requires_user = False

    def get(self) -> None:
        self.answer({"status": "ok"})


class NotFound(ApiHandler):
    """Any other path: a JSON 404 (before authentication: it names no resource)."""

    requires_user = False

    def prepare(self) -> None:
        raise ApiError(404, "NotFound", f"no route {self.request.path!r}; the API is under {API}/ (docs/gateway.md)")


class Deployments(ApiHandler):
    async def get(self) -> None:
        found = await self.blocking(self.core.deployments.all)
        self.answer({"deployments": [
            {"name": name, "source": record.source, "shards": record.n_shards, "policy": record.policy.to_dict()}
            for name, record in sorted(found.items()) if self.user.may_use(name)]})


class DeploymentInfo(ApiHandler):
    """What a client needs to trace the deployment without its weights (config, modules, tokenizer)."""

    async def get(self, name: str) -> None:
        served = await self.blocking(served_or_404, self.core, self.user, name)
        self.answer({"name": name, "policy": served.record.policy.to_dict(), **served.description})


class Experiments(ApiHandler):
    def prepare(self) -> None:
        super().prepare()
        if self.request.method == "POST":
            self.admit()

    async def post(self) -> None:
        if self._overflow:
            raise self._too_large()
        self._working = True
        try:
            pool = self.core.validation_pool.submit(self.user.name, submission, self.core, self.user, self._body)
            deployment, decoded, keepalive = await asyncio.wrap_future(pool)
        finally:
            self._working = False
            self.release()
        job = Job(uuid.uuid4().hex, self.user, deployment, decoded, keepalive=keepalive)
        try:
            self.core.dispatcher.admit(job)
        except QuotaExceeded as exc:
            raise ApiError(429, "QuotaExceeded", str(exc), **error_to_json(exc)["fields"]) from None
        self.answer({"experiment": job.id, **{k: v for k, v in job.event.items() if k != "experiment"}}, 202)

    def get(self) -> None:
        rows = self.core.state.of_user(self.user.name)
        self.answer({"experiments": [self.status_of(row) for row in rows]})


class Experiment(ApiHandler):
    async def get(self, experiment: str) -> None:
        row = self.own_row(experiment)
        wait = self.get_query_argument("wait", None)
        if wait is not None and row["status"] not in FINAL:
            try:
                seconds = float(wait)
            except ValueError:
                seconds = math.nan
            if not math.isfinite(seconds):  # nan would reach the event loop's timers
                raise ApiError(400, "MalformedRequest", f"?wait= takes seconds, not {wait[:40]!r}")
            seconds = min(max(seconds, 0.0), MAX_WAIT)
            job = self.core.dispatcher.jobs.get(experiment)
            if job is not None:
                job.watchers += 1  # a client waiting on its status is watching (keepalive)
            try:
                await self.core.wait_final(experiment, seconds)
            finally:
                if job is not None:
                    job.watchers -= 1
            row = self.own_row(experiment)
        status = self.status_of(row)
        if row["status"] == "COMPLETED" and self.get_query_argument("result", "") in ("1", "true"):
            # The result with the status that says it is there: a waiting client needs no second request
            # (64 HTTP users on 4 simulated shards without that request: 154-163 exp/s against 141-149).
            document = await self.blocking(self.core.state.load_result, experiment)
            if document is not None:  # gone: the client asks /result, which says so
                self.set_header("Content-Type", "application/json")
                self.finish(json.dumps(status)[:-1].encode() + b', "result": ' + document + b"}")
                return
        self.answer(status)

    def delete(self, experiment: str) -> None:
        self.cancel(experiment)

    def cancel(self, experiment: str) -> None:
        row = self.own_row(experiment)
        job = self.core.dispatcher.jobs.get(experiment)
        if job is not None:
            self.core.dispatcher.cancel(job)
            row = self.core.state.get(experiment) or row
        self.answer(self.status_of(row), 202 if row["status"] not in FINAL else 200)


class Cancel(Experiment):
    def post(self, experiment: str) -> None:  # type: ignore[override]
        self.cancel(experiment)


class Result(ApiHandler):
    async def get(self, experiment: str) -> None:
        row = self.own_row(experiment)
        if row["status"] != "COMPLETED":
            error = row["error"] or {}
            raise ApiError(409, "NotCompleted", f"experiment {experiment} is {row['status']}; results exist once it is "
                           "COMPLETED" + (f" ({error.get('message')})" if error else ""), status=row["status"])
        document = await self.blocking(self.core.state.load_result, experiment)
        if document is None:
            raise ApiError(410, "Gone", f"the result of experiment {experiment} is no longer kept by the gateway")
        self.set_header("Content-Type", "application/json")
        self.finish(document)


class StoreObject(ApiHandler):
    """Objects of an experiment's persisted saves, for clients with no access to the store: the
    client opens the Zarr arrays over HTTP, so a lazy slice fetches only the chunks it needs."""

    async def get(self, experiment: str, key: str) -> None:
        row = self.own_row(experiment)
        prefix = row["store_prefix"]
        parts = key.split("/")
        if any(ord(c) < 32 or c in "\\\x7f" for c in key):
            raise ApiError(400, "MalformedRequest", f"an object key has no control characters or backslashes: {key!r}")
        if (row["status"] != "COMPLETED" or not prefix or parts[0] != prefix
                or any(part in ("", ".", "..") for part in parts) or posixpath.normpath(key) != key):
            raise ApiError(404, "NotFound", f"experiment {experiment} has no persisted object {key!r}")
        wanted = _byte_range(self.request.headers.get("Range"))
        content, span = await self.blocking(_read, row["store_url"], key, wanted, experiment)
        self.set_header("Content-Type", "application/octet-stream")
        if span is not None:
            self.set_status(206)
            self.set_header("Content-Range", span)
        self.finish(content)


class Events(websocket.WebSocketHandler):
    """``/v1/experiments/<id>/events``: the experiment's status events so far, then live ones, one JSON
    message each; closed after the final one. An open stream keeps the experiment's keepalive.

    The stream is one-way: a message from the client closes it (code 1003, with the reason)."""

    def initialize(self, core: GatewayCore) -> None:
        self.core = core
        self._stop: Any = None
        self._sent = -1
        self._job: Job | None = None

    def check_origin(self, origin: str) -> bool:
        return True  # a key, not a cookie, authenticates: another site's page cannot borrow it

    async def get(self, *args: Any, **kwargs: Any) -> None:
        user = self.core.keys.authenticate(self.request.headers.get("Authorization"))
        row = self.core.state.get(args[0])
        if user is None:
            self.set_status(401)
            self.finish(json.dumps({"error": {"type": "Unauthorized", "message": "a valid API key is needed"}}))
            return
        if row is None or row["user"] != user.name:
            self.set_status(404)
            self.finish(json.dumps({"error": {"type": "NotFound", "message": f"no experiment {args[0]}"}}))
            return
        await super().get(*args, **kwargs)

    def on_message(self, message: str | bytes) -> None:
        self.close(1003, "this stream only sends: status events come from the gateway, nothing is read")

    def open(self, experiment: str) -> None:  # type: ignore[override]
        self._job = self.core.dispatcher.jobs.get(experiment)
        if self._job is None:  # already final
            row = self.core.state.get(experiment) or {}
            self._send({"experiment": experiment, "status": row.get("status"),
                        **({"error": row["error"]} if row.get("error") else {})})
            return
        self._job.watchers += 1
        self._stop = self.core.events.listen(experiment, self._send)
        for event in self.core.events.history(experiment):
            self._send(event)

    def _send(self, event: dict[str, Any]) -> None:
        seq = event.get("seq", self._sent + 1)
        if seq <= self._sent or self.ws_connection is None:
            return
        self._sent = seq
        self.write_message(json.dumps(event))
        if event.get("status") in FINAL:
            self.close()

    def on_close(self) -> None:
        if self._stop is not None:
            self._stop()
        if self._job is not None:
            self._job.watchers -= 1
            self._job.seen()
            self._job = None


_RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")


def _byte_range(header: str | None) -> tuple[int | None, int | None] | None:
    """A ``Range: bytes=a-b`` header as ``(a, b)`` (``bytes=a-``: ``(a, None)``; the last n bytes,
    ``bytes=-n``: ``(None, n)``), None without one; 416 for anything else (several ranges, b < a)."""
    if header is None:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        raise ApiError(416, "RangeNotSatisfiable", f"Range {header[:100]!r} is not one 'bytes=first-last' range "
                       "(or 'bytes=first-', 'bytes=-count'); this route serves one range per request")
    first = int(match.group(1)) if match.group(1) else None
    last = int(match.group(2)) if match.group(2) else None
    if first is not None and last is not None and last < first:
        raise ApiError(416, "RangeNotSatisfiable", f"Range {header!r} ends before it starts")
    return first, last


def _read(url: str, key: str, wanted: tuple[int | None, int | None] | None,
          experiment: str) -> tuple[bytes, str | None]:
    """Object ``key`` of the store at ``url`` (the part ``wanted``, see :func:`_byte_range`) and its
    ``Content-Range``. A missing key or one that is not a whole object (a directory) answers 404, a
    range past its end 416, a failing store 502 without what the store said."""
    missing = ApiError(404, "NotFound", f"experiment {experiment} has no persisted object {key!r}")
    try:
        fs, root = StoreLocation(url).filesystem()
        path = posixpath.join(root, key)
        info = fs.info(path)
        if info.get("type") != "file":
            raise missing
        size = int(info["size"])
        if wanted is None:
            return fs.cat_file(path), None
        first, last = wanted
        if first is None:  # the last `last` bytes
            first, last = max(0, size - int(last or 0)), size - 1
        if first >= size or size == 0:
            raise ApiError(416, "RangeNotSatisfiable", f"the range starts at byte {first}; object {key!r} has "
                           f"{size} bytes", size=size)
        stop = size if last is None else min(last + 1, size)
        return fs.cat_file(path, first, stop), f"bytes {first}-{stop - 1}/{size}"
    except ApiError:
        raise
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise missing from None
    except Exception:
        logger.warning("reading %r of experiment %s from store %r failed", key, experiment, url, exc_info=True)
        raise ApiError(502, "StoreUnavailable", f"the store holding experiment {experiment}'s saves could not be "
                       "read; what it answered is in the gateway's log") from None


def routes(core: GatewayCore) -> list[tuple[str, type, dict[str, Any]]]:
    args = {"core": core}
    return [
        (f"{API}/health", Health, args),
        (f"{API}/deployments", Deployments, args),
        (f"{API}/deployments/([^/]+)", DeploymentInfo, args),
        (f"{API}/experiments", Experiments, args),
        (f"{API}/experiments/{_EXPERIMENT}", Experiment, args),
        (f"{API}/experiments/{_EXPERIMENT}/cancel", Cancel, args),
        (f"{API}/experiments/{_EXPERIMENT}/result", Result, args),
        (f"{API}/experiments/{_EXPERIMENT}/events", Events, args),
        (f"{API}/experiments/{_EXPERIMENT}/store/(.+)", StoreObject, args),
    ]


def validation_error(exc: Exception) -> ApiError:
    """The answer to a graph the gateway refuses: 403 for the deployment's policy, 422 for the rest."""
    status = 403 if isinstance(exc, PolicyError) else 422
    wire = error_to_json(exc)
    return ApiError(status, wire["type"], wire["message"], **wire["fields"])


def submission(core: GatewayCore, user: User, body: bytes | bytearray) -> tuple[str, InterventionGraph, float | None]:
    """A submission's body parsed and its graph validated (in the validation pool): the deployment's
    name, the graph, and the keepalive."""
    try:
        data = parse_json(body, core.max_json_values)
    except BodyError as exc:
        raise ApiError(exc.status, "PayloadTooLarge" if exc.status == 413 else "MalformedRequest", str(exc),
                       **{k: v for k, v in exc.fields.items() if k != "status"}) from None
    if not isinstance(data, dict):
        raise ApiError(400, "MalformedRequest", f"the request body must be a JSON object, not {type(data).__name__}")
    deployment, graph, keepalive = data.get("deployment"), data.get("graph"), data.get("keepalive")
    if not isinstance(deployment, str) or not deployment:
        raise ApiError(400, "MalformedRequest", "field 'deployment' (the deployment's name) is required")
    if not isinstance(graph, (str, dict)):
        raise ApiError(400, "MalformedRequest", "field 'graph' (the intervention graph, as JSON text or an "
                       "object) is required")
    if keepalive is not None and (isinstance(keepalive, bool) or not isinstance(keepalive, (int, float))
                                  or not 0 < keepalive <= 86400):
        raise ApiError(400, "MalformedRequest", "field 'keepalive' is a number of seconds in (0, 86400]")
    if isinstance(graph, str) and json_values(graph) > core.max_json_values:
        raise ApiError(413, "PayloadTooLarge", f"field 'graph' holds about {json_values(graph):,} JSON values, over "
                       f"the gateway's limit of {core.max_json_values:,} (nnsight-dask.gateway-max-json-values)",
                       limit=core.max_json_values)
    return deployment, validate(core, user, deployment, graph), float(keepalive) if keepalive is not None else None


def validate(core: GatewayCore, user: User, deployment: str, graph: str | dict[str, Any]) -> InterventionGraph:
    """Decode and check a graph for ``deployment`` the way its shards will (they check again), with
    its store bounded to the user's (:mod:`.stores`)."""
    served = served_or_404(core, user, deployment)
    try:
        decoded = decode_graph(graph)
        scope_graph(decoded, user, core.result_store)
        check_graph(decoded, served.module_paths, policy=served.record.policy,
                    context_length=served.context_length, vocab_size=served.vocab_size)
    except GraphValidationError as exc:
        raise validation_error(exc) from None
    decoded.model = deployment
    return decoded


def served_or_404(core: GatewayCore, user: User, name: str) -> Any:
    if not user.may_use(name):
        raise ApiError(404, "NotFound", f"no deployment {name!r} is open to user {user.name!r}")
    try:
        return core.deployments.get(name)
    except DeploymentError as exc:
        raise ApiError(404, "NotFound", str(exc)) from None


__all__ = ["ApiError", "routes", "submission", "validate"]
