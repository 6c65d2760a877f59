"""Scheduler preload: the Experiments page and its plots on the Dask dashboard, from the start.

Load it with ``dask scheduler --preload nnsight_dask.service.dashboard`` or
``LocalCluster(scheduler_kwargs={"preload": ["nnsight_dask.service.dashboard"]})`` (the CLI does).
Importing the module adds our Bokeh documents to the dashboard's own applications, which is why it
must be a preload (imported before the dashboard starts): they are then served, listed in the
"More..." menu and in ``/individual-plots.json`` like Dask's plots (:mod:`nnsight_dask.scheduler.pages`).
``dask_setup`` installs the experiment monitor (:mod:`nnsight_dask.scheduler.monitor`, which
``nd.serve`` also installs), whose data the pages show, and puts "Experiments" in the navigation bar.
A scheduler started without the preload gets the pages when ``nd.serve`` first reaches it
(:func:`nnsight_dask.scheduler.pages.add_page`).
"""
from __future__ import annotations

from typing import Any

from ..scheduler import monitor as monitor_module
from ..scheduler import pages


def dask_setup(scheduler: Any) -> None:
    """Preload hook: install the experiment monitor now, so the pages have data from the start, and
    link the Experiments page from the navigation bar."""
    monitor_module.install(scheduler)
    if getattr(scheduler, "http_application", None) is not None:
        pages.add_to_navigation(scheduler)


pages.register()
