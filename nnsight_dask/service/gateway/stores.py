"""Where a gateway user's persisted saves may go: their prefix of the operator's result store.

A user of the gateway names a store as a Dask client's user does (``store=`` on a trace), but it is
resolved here and bounded on the shards: a relative name (``store="run1"``) lands under
``<result store>/<user>/``; an absolute path or URL must lie under that prefix or under one of the
user's ``stores`` in keys.toml. The gateway writes the user and those prefixes into the graph's
``store_scope`` option (replacing whatever the request said), and every shard checks the store
against it and against the deployment's policy before the experiment runs
(:func:`nnsight_dask.graph.policy.check_policy`): network stores only where the policy lists them,
``storage_options`` only those the policy lists.
"""
from __future__ import annotations

import posixpath

from ...graph.graph import InterventionGraph
from .keys import User


def user_root(result_store: str, user: User) -> str:
    """``user``'s prefix of the result store (a normalized URL)."""
    return posixpath.join(result_store, user.name)


def scope_graph(graph: InterventionGraph, user: User, result_store: str) -> None:
    """Set ``graph``'s ``store_scope`` for ``user`` and resolve a relative ``store`` under their prefix."""
    root = user_root(result_store, user)
    store = graph.options.get("store")
    if isinstance(store, str) and store and _relative(store):
        graph.options["store"] = posixpath.join(root, store)
    graph.options["store_scope"] = {"user": user.name, "stores": [root, *user.stores]}


def _relative(store: str) -> bool:
    return "://" not in store and "::" not in store and not store.startswith(("/", "~", "\\")) and ":" not in store[:3]


__all__ = ["scope_graph", "user_root"]
