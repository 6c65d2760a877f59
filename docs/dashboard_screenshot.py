"""Regenerate ``docs/dashboard-experiments.png``: the dashboard's Experiments page after a few experiments.

Run from the repository root (40-60 s on 2 CPU cores, no GPU, no network)::

    python docs/dashboard_screenshot.py                  # writes docs/dashboard-experiments.png
    python docs/dashboard_screenshot.py -o /tmp/page.png # somewhere else

It needs a headless Chromium. On Debian/Ubuntu: ``apt-get update && apt-get install -y chromium``
(the ``chromium-headless-shell`` package works too); set ``CHROMIUM=/path/to/binary`` to use another
Chromium or Chrome.

What it does: starts a ``LocalCluster`` (2 worker processes, 1 thread each, the dashboard on a free
port, the scheduler preload ``nnsight_dask.service.dashboard``), deploys a tiny 2-layer GPT-2 in
2 shards, runs rounds of experiments for 15 s (each round a short generation and 5 traces in flight
together as user "demo", which share forward passes on the shards, then a trace as "alice"), then one
that fails with an out-of-range index so the error column has something to show, waits until
``/nnsight/experiments.json`` lists them all as finished, then opens ``/experiments?user=demo``
(demo's rows highlighted) in headless Chromium and screenshots it once its table has drawn rows.

``chromium --screenshot URL`` is not enough: it shoots when the HTML has loaded, before BokehJS has
received the document over its websocket (a blank page). So Chromium is driven over its DevTools
protocol (tornado's websocket client) and polled until the rows are in the DOM.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")   # quiet weight loading, here and on workers

OUT = Path(__file__).resolve().parent / "dashboard-experiments.png"
CANDIDATES = ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome", "google-chrome-stable")
WIDTH, HEIGHT = 1400, 1150
#: How long experiments run before the shot (the plots sample once a second).
ROUNDS_SECONDS = 15.0
#: The user whose rows the page is opened to highlight (most experiments are theirs).
USER = "demo"
os.environ.setdefault("NNSIGHT_DASK_USER", USER)   # the "user" column (read when nnsight_dask is imported)


def find_chromium() -> str:
    """The Chromium binary: ``$CHROMIUM``, else the first of :data:`CANDIDATES` on ``PATH``."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        found = shutil.which(explicit)
        if not found:
            sys.exit(f"CHROMIUM={explicit!r} is not an executable")
        return found
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    sys.exit("No headless Chromium found (looked for " + ", ".join(CANDIDATES) + " on PATH).\n"
             "Install it with:  apt-get update && apt-get install -y chromium\n"
             "or point CHROMIUM=/path/to/chrome at another Chromium/Chrome binary.")


def run_experiments(client, name: str, seconds: float = ROUNDS_SECONDS) -> int:
    """Rounds for ``seconds``: a short generation and five traces in flight together (they share
    forward passes on the shards) as user "demo", then a trace as "alice"; then one experiment that
    fails. Returns how many were started."""
    import dask

    import nnsight_dask as nd
    from nnsight_dask.errors import InterventionError

    lm = nd.RemoteModel(client, name)
    prompts = ["The Eiffel Tower is", "The capital of France is", "Once upon a time",
               "The cat sat on the", "Paris is a city in"]
    started, end = 0, time.monotonic() + seconds
    for round_ in itertools.count():
        if time.monotonic() > end:
            break
        with lm.generate("The Eiffel Tower is", max_new_tokens=3, blocking=False) as tracer:
            lm.generator.output.save()
        in_flight = [tracer]
        for prompt in prompts:
            with lm.trace(prompt, blocking=False) as tracer:
                lm.transformer.h[0].output[:, -1] = 0
                lm.output.logits[:, -1].argmax(-1).save()
            in_flight.append(tracer)
        for tracer in in_flight:
            tracer.future.result(timeout=60)
        with dask.config.set({"nnsight-dask.user": "alice"}), lm.trace(prompts[round_ % len(prompts)]):
            lm.output.logits[:, -1].argmax(-1).save()
        started += len(in_flight) + 1
        time.sleep(0.3 * (round_ % 3))  # an uneven load, so the plots have a shape
    try:
        with lm.trace("The Eiffel Tower is"):
            lm.transformer.h[1].output[:, 50].save()   # the prompt has 4 tokens, not 51
    except InterventionError:
        pass
    return started + 1


def wait_for_rows(base: str, count: int, timeout: float = 20.0) -> list[dict]:
    """Poll the JSON endpoint until ``count`` experiments are listed as finished."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(base + "/nnsight/experiments.json", timeout=10) as response:
            rows = json.loads(response.read())["experiments"]
        if sum(r["status"] in ("completed", "failed") for r in rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


#: Rows the page's table draws at once (it draws only those in view).
VISIBLE_ROWS = 8

#: Per DataTable on the page: its drawn height and how many rows it drew (BokehJS renders each
#: model inside a shadow root, so we walk them).
TABLES_JS = """(() => {
  const tables = [];
  const walk = (root) => {
    for (const el of root.querySelectorAll('*')) {
      if (!el.shadowRoot) continue;
      if (el.classList.contains('bk-DataTable'))
        tables.push({height: el.getBoundingClientRect().height,
                     rows: el.shadowRoot.querySelectorAll('.slick-row').length});
      walk(el.shadowRoot);
    }
  };
  walk(document);
  return tables;
})()"""

async def _capture(port: int, url: str, min_rows: int, deadline: float) -> bytes:
    """Over the DevTools protocol: open ``url``, wait until a table has drawn ``min_rows`` rows, screenshot."""
    import base64

    from tornado.httpclient import AsyncHTTPClient
    from tornado.websocket import websocket_connect

    targets = json.loads((await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/json/list")).body)
    page = next(t for t in targets if t["type"] == "page")
    ws = await websocket_connect(page["webSocketDebuggerUrl"], max_message_size=64 << 20)
    ids = iter(range(1, 1 << 30))

    async def call(method: str, **params):
        sent = next(ids)
        await ws.write_message(json.dumps({"id": sent, "method": method, "params": params}))
        while True:
            raw = await ws.read_message()
            if raw is None:
                raise RuntimeError("chromium closed the DevTools connection")
            message = json.loads(raw)
            if message.get("id") == sent:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def evaluate(expression: str):
        result = (await call("Runtime.evaluate", expression=expression, returnByValue=True))["result"]
        return result.get("value")

    try:
        await call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1,
                   mobile=False)
        await call("Page.navigate", url=url)
        tables: list[dict] = []
        while not any(t["rows"] >= min_rows for t in tables):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no table on the page drew {min_rows} rows (tables: {tables})")
            await asyncio.sleep(0.25)
            tables = await evaluate(TABLES_JS) or []
        await asyncio.sleep(0.5)   # let the last paint land
        shot = await call("Page.captureScreenshot", format="png")
        return base64.b64decode(shot["data"])
    finally:
        ws.close()


def screenshot(chromium: str, url: str, out: Path, min_rows: int, *, timeout: float = 30.0) -> None:
    """Headless Chromium renders the Bokeh page (BokehJS, fed over a websocket) into ``out``.

    ``chromium --screenshot`` would shoot as soon as the HTML has loaded, before the document has
    arrived over Bokeh's websocket (a blank page), so we drive Chromium over its DevTools protocol
    and wait until one table has drawn at least ``min_rows`` rows.
    """
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="chromium-profile-", ignore_cleanup_errors=True) as profile, \
            tempfile.TemporaryFile("w+") as log:
        command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                   "--no-first-run", "--no-default-browser-check", "--hide-scrollbars", "--mute-audio",
                   f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}",
                   "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"]
        browser = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            while not (port_file.exists() and port_file.read_text().strip()):
                if browser.poll() is not None:
                    log.seek(0)
                    sys.exit(f"chromium exited with {browser.returncode}:\n{log.read()[-2000:]}")
                if time.monotonic() > deadline:
                    sys.exit("chromium did not open its DevTools port in time")
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            try:
                png = asyncio.run(_capture(port, url, min_rows, deadline))
            except TimeoutError as exc:
                sys.exit(f"{url}: {exc}")
        finally:
            browser.terminate()
            try:
                browser.wait(10)
            except subprocess.TimeoutExpired:
                browser.kill()
                browser.wait()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=OUT, help=f"PNG to write (default: {OUT})")
    args = parser.parse_args(argv)
    chromium = find_chromium()
    started = time.monotonic()

    from distributed import Client, LocalCluster

    import nnsight_dask as nd
    from nnsight_dask.models import save_tiny

    nd.config.verbose = False   # no progress bars

    with tempfile.TemporaryDirectory(prefix="nnsight-dask-screenshot-") as tmp:
        path = str(save_tiny(Path(tmp) / "tiny-gpt2", arch="gpt2", n_layer=2))
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0",
                          silence_logs=logging.CRITICAL,   # the failing experiment's traceback is expected
                          scheduler_kwargs={"preload": ["nnsight_dask.service.dashboard"]},
                          env={"OMP_NUM_THREADS": "1", "NNSIGHT_DASK_TORCH_THREADS": "1"}) as cluster, \
                Client(cluster) as client:
            nd.serve(client, path, shards=2, name="tiny-gpt2")
            count = run_experiments(client, "tiny-gpt2")
            base = client.dashboard_link.rsplit("/", 1)[0]
            rows = wait_for_rows(base, count)
            statuses = sorted(r["status"] for r in rows)
            print(f"{len(rows)} experiments: {statuses}")
            time.sleep(2.0)   # the last experiments in the plots' next points
            screenshot(chromium, f"{base}/experiments?user={USER}", args.output, min_rows=min(len(rows), VISIBLE_ROWS))
    size = args.output.stat().st_size
    print(f"wrote {args.output} ({size // 1024} KiB) in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
