"""The client side of a Dask cluster: deployments, remote models, experiments (imports distributed).

- :func:`serve`, :func:`undeploy`, :func:`deployments`, :func:`recover`: deployments by name, each
  recorded as a :class:`Deployment`.
- :class:`RemoteModel`: a deployed model that traces like a local one; ``RemoteModel(client, name)``
  is a :class:`DaskRemoteModel`, ``RemoteModel(url, name, api_key=...)`` an :class:`HttpRemoteModel`
  (both imported here, so that ``RemoteModel`` knows them).
- :func:`run_experiment` / :class:`ExperimentFuture`: one experiment's launch, wait and retry.
"""
from __future__ import annotations

from .deployment import deployments, get_deployment, recover, serve, undeploy
from .experiment import run_experiment
from .futures import ExperimentFuture
from .http_remote import HttpRemoteModel
from .record import Deployment, ShardPlacement
from .remote import DaskRemoteModel
from .remote_model import RemoteModel

__all__ = ["DaskRemoteModel", "Deployment", "ExperimentFuture", "HttpRemoteModel", "RemoteModel", "ShardPlacement",
           "deployments", "get_deployment", "recover", "run_experiment", "serve", "undeploy"]
