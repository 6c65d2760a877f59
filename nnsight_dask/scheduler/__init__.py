"""Deployments and experiments on a Dask cluster (imports distributed)."""
from __future__ import annotations

from .deployment import deployments, get_deployment, recover, serve, undeploy
from .experiment import ExperimentFuture, run_experiment
from .remote import RemoteModel

__all__ = ["ExperimentFuture", "RemoteModel", "deployments", "get_deployment", "recover", "run_experiment",
           "serve", "undeploy"]
