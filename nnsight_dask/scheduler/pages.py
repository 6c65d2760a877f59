"""Our pages on Dask's dashboard, found where Dask's own are: the navigation bar, its "More..." menu
and ``/individual-plots.json`` (what JupyterLab's dask-labextension lists).

How Dask builds its dashboard: when the scheduler starts, one Bokeh application serves every
document function in ``distributed.dashboard.scheduler.applications`` (path -> function); the
pages' template draws the bar from ``template_variables(scheduler)["pages"]`` and the menu from its
``"plots"`` (one per ``/individual-*`` path), a dict made once per scheduler and shared by every
page's template; ``/individual-plots.json`` lists the ``/individual-*`` paths of that first Bokeh
application. So there are two ways in:

- **The preload** (``nnsight_dask.service.dashboard``, imported before the dashboard starts):
  :func:`register` adds our documents (:data:`~.experiments_page.APPLICATIONS`) to Dask's, and they
  are everywhere Dask's are.
- **A running scheduler** (``nd.serve`` on a plain ``LocalCluster``): :func:`add_page` serves them
  from a Bokeh application of their own next to Dask's, and adds them to the bar and menu. Dask's
  ``/individual-plots.json`` keeps listing its own application's paths only; start the scheduler with
  the preload to have ours there too.
"""
from __future__ import annotations

from typing import Any

from ..dask_compat import bokeh_applications, bokeh_prefix, has_bokeh_page
from .experiments_page import APPLICATIONS, INDIVIDUAL, PAGE


def register() -> None:
    """Add our pages to the ones Dask's dashboard serves (from a preload, before it starts)."""
    from distributed.dashboard import scheduler as dashboard

    for path, make_doc in APPLICATIONS.items():
        dashboard.applications.setdefault(path, make_doc)


def menu_name(path: str) -> str:
    """The name Dask's "More..." menu gives ``/individual-a-b`` ("A B")."""
    return " ".join(path.strip("/").split("-")[1:]).title()


def add_to_navigation(scheduler: Any) -> None:
    """The Experiments page in the bar of every dashboard page, and our individual plots in the
    "More..." menu, from the next page load on (idempotent)."""
    from distributed.dashboard.scheduler import template_variables

    variables = template_variables(scheduler)  # one dict per scheduler: its lists are every page's
    pages, plots = variables["pages"], variables["plots"]
    if PAGE.strip("/") not in pages:
        pages.append(PAGE.strip("/"))
    listed = {plot["url"] for plot in plots}
    plots.extend({"url": path.strip("/"), "name": menu_name(path)} for path in INDIVIDUAL
                 if path.strip("/") not in listed)
    plots.sort(key=lambda plot: plot["name"])


def add_page(scheduler: Any) -> bool:
    """Serve our pages on a running scheduler's dashboard that lacks them; True if added.

    Called in the scheduler's process, on its event loop (``nd.serve`` and the gateway reach it by
    ``run_on_scheduler``). Without a dashboard (bokeh missing, or disabled) it does nothing.
    """
    application = getattr(scheduler, "http_application", None)
    bokeh = bokeh_applications(application)
    if not bokeh:
        return False
    add_to_navigation(scheduler)
    if any(has_bokeh_page(app, PAGE) for app in bokeh):
        return False  # the preload, or an earlier call, put them there
    from distributed.dashboard.core import BokehApplication
    from distributed.dashboard.scheduler import template_variables
    from tornado.ioloop import IOLoop

    pages = BokehApplication(APPLICATIONS, scheduler, prefix=bokeh_prefix(bokeh[0]),
                             template_variables=template_variables(scheduler))
    application.add_application(pages)
    pages.initialize(IOLoop.current())
    pages.start()
    return True
