"""Every use of a private Dask (or Bokeh-through-Dask) API, in one place.

Why: a Dask upgrade that moves one of these breaks this module only, and its tests say which.
Each function degrades to doing nothing where the private name is gone, because all of them serve
speed or monitoring, never correctness.
"""
from __future__ import annotations

from typing import Any


def send_to_scheduler(client: Any, message: dict[str, Any]) -> None:
    """Put ``message`` on the client's batched stream to the scheduler (``Client._send_to_scheduler``,
    what ``client.submit`` itself uses): no round trip, ordered with the client's other messages."""
    client._send_to_scheduler(message)


def send_to_scheduler_from_loop(client: Any, message: dict[str, Any]) -> None:
    """:func:`send_to_scheduler` for code already on the client's event loop: no hand-off to the loop
    (``Client._send_to_scheduler_safe``)."""
    client._send_to_scheduler_safe(message)


def shorten_stream_interval(client: Any, interval: float) -> None:
    """Send the client's batched messages to the scheduler at least every ``interval`` seconds
    (Dask holds them up to 10 ms); a reconnecting client gets a new stream, so call it again."""
    stream = getattr(client, "scheduler_comm", None)
    if stream is not None and getattr(stream, "interval", 0) > interval:
        stream.interval = interval


def task_stream_add(scheduler: Any, entry: dict[str, Any]) -> None:
    """Draw ``entry`` (``key``, ``worker``, ``thread``, ``startstops``...) in the dashboard's task
    stream, as if a task had run, when the scheduler keeps one (``TaskStreamPlugin.buffer``)."""
    plugin = getattr(scheduler, "plugins", {}).get("task-stream") if scheduler is not None else None
    if plugin is not None and hasattr(plugin, "buffer"):
        plugin.buffer.append(entry)
        plugin.index += 1


def bokeh_applications(application: Any) -> list[Any]:
    """The Bokeh applications mounted on a scheduler's HTTP server (those with ``_applications``)."""
    return [app for app in getattr(application, "applications", ()) if hasattr(app, "_applications")]


def has_bokeh_page(app: Any, path: str) -> bool:
    """Whether the Bokeh application ``app`` serves a page at ``path``."""
    return path in app._applications


def bokeh_prefix(app: Any) -> str:
    return str(getattr(app, "_prefix", ""))


def use_dashboard_template(doc: Any, extra: dict[str, Any], page: bool = True) -> None:
    """Give a Bokeh document of ours the dashboard's look: its theme, and (``page``) its template
    with the navigation bar (``extra`` holds the bar's pages and "More..." plots), as Dask's own
    pages have (``distributed.dashboard.components.scheduler.env`` and ``BOKEH_THEME``)."""
    try:
        from distributed.dashboard.components.scheduler import BOKEH_THEME, env
    except ImportError:
        return
    doc.theme = BOKEH_THEME
    if page:
        doc.template = env.get_template("simple.html")
        doc.template_variables.update(extra)


def current_task_key() -> Any:
    """The key of the task running in this worker thread (``distributed.worker.thread_state.key``;
    None outside a task)."""
    from distributed.worker import thread_state

    return getattr(thread_state, "key", None)


def task_released(worker: Any, key: Any) -> bool:
    """Whether the worker no longer wants task ``key``'s result: its client cancelled or released it
    while it ran (the worker's state ``cancelled``), or it is gone. False for ``key`` None."""
    if key is None:
        return False
    tasks = getattr(getattr(worker, "state", None), "tasks", None)
    if tasks is None:
        return False
    task = tasks.get(key)
    return task is None or task.state in ("cancelled", "released", "forgotten")
