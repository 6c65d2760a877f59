"""Recording interventions: envoys over the module tree, proxies, tracers and model wrappers."""
from __future__ import annotations

from .envoy import Envoy
from .model import LanguageModelWrapper, ModuleWrapper
from .proxy import Proxy
from .tracer import Invoker, Session, Tracer, apply, dict_, list_

__all__ = ["Envoy", "Invoker", "LanguageModelWrapper", "ModuleWrapper", "Proxy", "Session", "Tracer", "apply", "dict_", "list_"]
