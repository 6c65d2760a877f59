"""The client side of a Dask cluster: deployments, remote models, experiments (imports distributed).

- :func:`serve`, :func:`undeploy`, :func:`deployments`, :func:`recover`: deployments by name, each
  recorded as a :class:`Deployment`.
- :class:`RemoteModel`: a deployed model that traces like a local one.
- :func:`run_experiment` / :class:`ExperimentFuture`: one experiment's launch, wait and retry.
"""
from __future__ import annotations

from .deployment import deployments, get_deployment, recover, serve, undeploy
from .experiment import run_experiment
from .futures import ExperimentFuture
from .record import Deployment, ShardPlacement
from .remote import RemoteModel

__all__ = ["Deployment", "ExperimentFuture", "RemoteModel", "ShardPlacement", "deployments", "get_deployment",
           "recover", "run_experiment", "serve", "undeploy"]
