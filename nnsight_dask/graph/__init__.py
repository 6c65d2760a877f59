"""The intervention graph: a plain, JSON-serializable record of an experiment."""
from __future__ import annotations

from .graph import InterventionGraph, Iteration, Pass
from .node import Kind, Node, Ref

__all__ = ["InterventionGraph", "Iteration", "Kind", "Node", "Pass", "Ref"]
