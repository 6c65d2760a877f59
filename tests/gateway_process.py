"""A gateway in a process of its own, started by its CLI as an operator would, for attack tests.

The tests of :mod:`tests.test_gateway` run the gateway in the test's process; attacks on its event
loop, its threads and its file descriptors need it apart, with a file descriptor limit like a
production one and its log to read.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests


@dataclass
class GatewayProcess:
    url: str
    host: str
    port: int
    pid: int
    log: Path
    state_dir: Path
    #: Where users' saves go (the default: ``<state dir>/store``).
    result_store: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def rss(self) -> int:
        """The gateway process's resident memory, in bytes."""
        import psutil

        return int(psutil.Process(self.pid).memory_info().rss)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml(users: Mapping[str, Mapping[str, Any]]) -> str:
    lines = []
    for name, table in users.items():
        lines.append(f"[users.{name}]")
        for key, value in table.items():
            if isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            elif isinstance(value, list):
                lines.append(f"{key} = [" + ", ".join(f'"{v}"' for v in value) + "]")
            else:
                lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def gateway_process(scheduler: str, directory: Path, users: Mapping[str, Mapping[str, Any]], *,
                    nofile: int | None = 256, args: tuple[str, ...] = (), pythonpath: str | None = None,
                    env: Mapping[str, str] | None = None) -> Iterator[GatewayProcess]:
    """``nnsight-dask gateway`` for ``scheduler`` in a subprocess, limited to ``nofile`` file
    descriptors; returns once it answers ``/v1/health``; stopped with Ctrl-C (SIGINT) after."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = directory / "keys.toml"
    keys.write_text(_toml(users))
    port = free_port()
    state, log = directory / "state", directory / "gateway.log"
    command = [sys.executable, "-m", "nnsight_dask.service.cli", "gateway", "--scheduler", scheduler,
               "--keys", str(keys), "--port", str(port), "--state-dir", str(state), *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "NNSIGHT_DASK_TORCH_THREADS": "1", **(env or {})}
    if pythonpath is not None:
        environment["PYTHONPATH"] = pythonpath

    def limit() -> None:
        if nofile is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with open(log, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=environment,
                                   preexec_fn=limit)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the gateway exited ({process.returncode}):\n{log.read_text()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/v1/health", timeout=2).ok:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not answer within 120 s:\n{log.read_text()}")
            time.sleep(0.2)
        yield GatewayProcess(url, "127.0.0.1", port, process.pid, log, state, state / "store")
    finally:
        process.send_signal(2)  # SIGINT: the CLI stops the gateway cleanly
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
