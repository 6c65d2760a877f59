"""Settings live in dask.config under ``nnsight-dask``; ``nd.config`` is the friendly front."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import dask
import pytest

import nnsight_dask as nd


def test_attribute_reads_and_writes_dask_config(settings: Any) -> None:
    assert settings is nd.config
    assert nd.config.persist_threshold == dask.config.get("nnsight-dask.persist-threshold") == 1 << 20
    nd.config.persist_threshold = 4096
    assert dask.config.get("nnsight-dask.persist-threshold") == 4096
    with dask.config.set({"nnsight-dask.persist-threshold": 77}):
        assert nd.config.persist_threshold == 77
    assert nd.config.persist_threshold == 4096


def test_unknown_setting_names_the_valid_ones() -> None:
    with pytest.raises(AttributeError, match="max_new_tokens_limit"):
        nd.config.get("max_tokens")
    with pytest.raises(AttributeError):
        nd.config.no_such_setting  # noqa: B018


def test_environment_variables_set_a_process_settings() -> None:
    """What an operator does for a worker: ``DASK_NNSIGHT_DASK__MAX_NEW_TOKENS_LIMIT=64``."""
    env = {**os.environ, "DASK_NNSIGHT_DASK__MAX_NEW_TOKENS_LIMIT": "64", "DASK_NNSIGHT_DASK__VERBOSE": "False"}
    code = "import nnsight_dask as nd; print(nd.config.max_new_tokens_limit, nd.config.verbose)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["64", "False"]
