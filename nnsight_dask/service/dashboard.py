"""Scheduler preload: an "Experiments" page on the Dask dashboard.

Load it with ``dask scheduler --preload nnsight_dask.service.dashboard`` or
``LocalCluster(scheduler_kwargs={"preload": ["nnsight_dask.service.dashboard"]})`` (the CLI does).
Importing the module adds the ``/experiments`` Bokeh page to the dashboard's applications, which is
why it must be a preload (imported before the dashboard starts). ``dask_setup`` installs the
experiment monitor (:mod:`nnsight_dask.scheduler.monitor`, which ``nd.serve`` also installs), whose
data the page shows and which serves ``/nnsight/experiments.json`` and ``/nnsight/metrics``.
A scheduler started without the preload gets the page when the monitor starts
(:func:`nnsight_dask.scheduler.experiments_page.add_page`).
"""
from __future__ import annotations

from typing import Any

from ..scheduler import monitor as monitor_module
from ..scheduler.experiments_page import PAGE, experiments_doc


def dask_setup(scheduler: Any) -> None:
    """Preload hook: install the experiment monitor now, so the page has data from the start."""
    monitor_module.install(scheduler)


def _install_page() -> None:
    from distributed.dashboard import scheduler as dashboard

    dashboard.applications.setdefault(PAGE, experiments_doc)


_install_page()
