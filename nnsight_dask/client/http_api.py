"""The client's side of the gateway's HTTP API: authenticated JSON requests, errors as exceptions.

A refusal comes back as the same exception a Dask client would raise (a graph the gateway refuses
raises :class:`~nnsight_dask.errors.GraphValidationError` or
:class:`~nnsight_dask.errors.PolicyError` with the user's line); everything else the gateway
answers with an error status raises :class:`GatewayError` with that status and the gateway's message.

One refusal is retried here instead: ``429`` because the user already has as many submissions being
read and validated as the gateway takes at once (several background traces of one user submitting
together); the request is sent again after a short, growing pause, for up to :data:`BUSY_SECONDS`.
"""
from __future__ import annotations

import os
import random
import time
from typing import Any

import requests

from .. import errors
from ..errors import NNsightDaskError
from ..http_wire import API, error_from_json

#: Environment variables giving the gateway's URL and the user's key when they are not passed.
URL_ENV, KEY_ENV = "NNSIGHT_DASK_URL", "NNSIGHT_DASK_API_KEY"
#: How long a submission refused only for the user's other submissions in progress is retried.
BUSY_SECONDS = 30.0


class GatewayError(NNsightDaskError):
    """The gateway answered an error status (``status``: 401 bad key, 404 not yours or not there,
    409 not completed, 413 body too large, 429 over your limit, ...)."""


class GatewaySession:
    """Requests to one gateway with one API key, shared by a model's traces (background ones run in
    threads; ``requests.Session`` pools their connections)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0) -> None:
        url = url or os.environ.get(URL_ENV)
        if not url:
            raise GatewayError(f"no gateway URL: pass it (nd.RemoteModel('http://host:8000', name)) or set {URL_ENV}")
        key = api_key or os.environ.get(KEY_ENV)
        if not key:
            raise GatewayError(f"no API key for {url}: pass api_key= or set {KEY_ENV}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {key}"}
        self._http = requests.Session()
        self._http.headers.update(self.headers)

    def close(self) -> None:
        self._http.close()

    def call(self, method: str, path: str, *, body: Any = None, params: dict[str, Any] | None = None,
             timeout: float | None = None) -> Any:
        """``method`` on ``/v1<path>``; the decoded JSON answer, or the error it stands for raised."""
        deadline, pause = time.monotonic() + BUSY_SECONDS, 0.05
        while True:
            try:
                response = self._http.request(method, f"{self.url}{API}{path}", json=body, params=params,
                                              timeout=timeout or self.timeout)
            except requests.RequestException as exc:
                raise GatewayError(f"cannot reach the gateway at {self.url}: {exc}", status=0) from None
            if response.status_code < 400:
                return response.json()
            error = _error(response)
            if getattr(error, "limit", None) != "max_submitting" or time.monotonic() > deadline:
                raise error
            time.sleep(pause * (0.5 + random.random()))
            pause = min(1.0, pause * 2)

    def store_url(self, experiment: str) -> str:
        """Where the gateway serves an experiment's persisted saves (a Zarr store over HTTP)."""
        return f"{self.url}{API}/experiments/{experiment}/store"


def _error(response: requests.Response) -> BaseException:
    try:
        error = dict(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return GatewayError(f"the gateway answered {response.status_code}: {response.text[:200]}",
                            status=response.status_code)
    kind = getattr(errors, str(error.get("type")), None)
    if isinstance(kind, type) and issubclass(kind, errors.GraphValidationError):
        return error_from_json(error)  # the graph was refused: the same error as on a Dask client
    return GatewayError(f"{error.get('message')} (HTTP {response.status_code})", status=response.status_code,
                        type=str(error.get("type")),
                        **{k: v for k, v in dict(error.get("fields") or {}).items() if k not in ("status", "type")})
