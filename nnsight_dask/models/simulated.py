"""A simulated-GPU model: a tiny Llama whose decoder layers take a fixed time per call.

On a GPU, one decoder layer over 1 or over 16 short prompts takes about the same few milliseconds:
the kernels are bound by launching and by reading the weights, not by the rows. A CPU runs the
other way round (its cost grows with the batch), so benchmarks of co-tenant batching and of the
control plane measured with CPU models say little about a GPU deployment. This module simulates
one. :func:`simulated_llama` is :func:`~nnsight_dask.models.tiny.tiny_llama` (hidden 32, 8 decoder
layers by default, the same seeded weights) whose every decoder layer first sleeps ``layer_ms``
milliseconds, then computes as usual:

- the cost is **flat in the batch** (a sleep, whatever the rows), as on a GPU;
- the **GIL is released** while it sleeps, as during a GPU kernel, so the rest of the process
  (Dask's event loop, other threads) runs meanwhile;
- the **numbers are the tiny Llama's**: the sleep changes the time, never a value, so every output
  equals :func:`tiny_llama` with the same seed.

It is a simulation, and results measured with it say so: the real arithmetic (hidden 32) adds a
few tenths of a millisecond per layer on top of the sleep, and nothing here models a GPU's memory,
transfers or the growth of the cost with long prompts.

Serving it: a deployment loads it from a callable source, :class:`SimulatedLlama` (a frozen,
picklable value: the workers import this module and call it)::

    nd.serve(client, SimulatedLlama(layer_ms=4.0), shards=4, name="sim")

A directory written by ``save_pretrained`` would load back as a plain ``LlamaForCausalLM`` (the
config names the architecture, not this layer class), silently losing the simulated time; so there
is no directory form.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from nnsight_dask.models.tiny import tiny_llama, tiny_tokenizer

__all__ = ["SIMULATED_LAYER_MS", "SimulatedLlama", "simulated_layer_class", "simulated_llama"]

#: Default simulated time of one decoder layer's call, in milliseconds (issue 25's benchmarks).
SIMULATED_LAYER_MS = 4.0


class _SleepFirst:
    """Mixin of :data:`SimulatedDecoderLayer`: sleep ``layer_ms`` milliseconds, then the layer's own forward."""

    layer_ms: float = SIMULATED_LAYER_MS

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self.layer_ms / 1000.0)
        return super().forward(*args, **kwargs)  # type: ignore[misc]

    def extra_repr(self) -> str:
        return f"simulated: {self.layer_ms:g} ms per call"


def simulated_layer_class() -> type[torch.nn.Module]:
    """``SimulatedDecoderLayer``: a ``LlamaDecoderLayer`` that sleeps ``layer_ms`` ms per call, then
    computes as usual.

    Made on first use, because transformers is imported lazily across the package (importing
    ``nnsight_dask`` does not import it); it is then this module's ``SimulatedDecoderLayer``, so a
    model holding such layers pickles by reference like any other.
    """
    with _MAKING:
        return _make_layer_class()


_MAKING = threading.Lock()


def _make_layer_class() -> type[torch.nn.Module]:
    cls = globals().get("SimulatedDecoderLayer")
    if cls is None:
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        cls = type("SimulatedDecoderLayer", (_SleepFirst, LlamaDecoderLayer),
                   {"__module__": __name__, "__qualname__": "SimulatedDecoderLayer",
                    "__doc__": simulated_layer_class.__doc__})
        globals()["SimulatedDecoderLayer"] = cls
    return cls


def __getattr__(name: str) -> Any:
    if name == "SimulatedDecoderLayer":  # unpickling a model finds the class here before anything made it
        return simulated_layer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def simulated_llama(n_layer: int = 8, hidden: int = 32, layer_ms: float = SIMULATED_LAYER_MS, seed: int = 0,
                    **config: Any) -> torch.nn.Module:
    """:func:`~nnsight_dask.models.tiny.tiny_llama` whose decoder layers take ``layer_ms`` ms per call.

    Same module paths, weights (for the same ``seed``) and outputs as ``tiny_llama(n_layer, hidden,
    seed)``; only time differs. Extra keyword arguments override ``LlamaConfig`` fields.

    Examples
    --------
    >>> model = simulated_llama(n_layer=2, layer_ms=1.0)
    >>> type(model.model.layers[0]).__name__, model.model.layers[0].layer_ms
    ('SimulatedDecoderLayer', 1.0)
    """
    if layer_ms < 0:
        raise ValueError(f"layer_ms must be >= 0 (milliseconds per decoder layer call), got {layer_ms!r}")
    model = tiny_llama(n_layer=n_layer, hidden=hidden, seed=seed, **config)
    simulated = simulated_layer_class()
    for layer in model.model.layers:
        layer.__class__ = simulated
        layer.layer_ms = float(layer_ms)
    return model


@dataclass(frozen=True)
class SimulatedLlama:
    """A model source for ``nd.serve``: calling it returns ``(simulated_llama(...), tiny_tokenizer())``.

    A plain value (it pickles by reference to this module), so any worker that can import
    ``nnsight_dask`` builds the same model; its ``repr`` names the simulation in the deployment's record.

    Examples
    --------
    >>> model, tokenizer = SimulatedLlama(n_layer=2, layer_ms=0.0)()
    >>> len(model.model.layers), tokenizer.padding_side
    (2, 'left')
    """

    n_layer: int = 8
    hidden: int = 32
    layer_ms: float = SIMULATED_LAYER_MS
    seed: int = 0

    @property
    def __name__(self) -> str:  # nd.serve names a deployment after its source's __name__ by default
        return f"simulated-llama-{self.n_layer}x{self.hidden}-{self.layer_ms:g}ms"

    def __call__(self) -> tuple[torch.nn.Module, Any]:
        model = simulated_llama(n_layer=self.n_layer, hidden=self.hidden, layer_ms=self.layer_ms, seed=self.seed)
        return model, tiny_tokenizer()
