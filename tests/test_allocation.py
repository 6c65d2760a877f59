"""Sizes of what an op is about to allocate, known before it runs (the policy's max_tensor_bytes)."""
from __future__ import annotations

import pytest
import torch

from nnsight_dask.errors import PolicyError
from nnsight_dask.graph.allocation import check_allocation, predicted_bytes

H = torch.zeros(1, 8, 64)  # a hidden state: 2 KiB of float32


@pytest.mark.parametrize("name, args, kwargs, expected", [
    ("torch.zeros", (2, 3), {"dtype": torch.float32}, 24),
    ("torch.ones", ((1 << 20, 1 << 20),), {}, 4 << 40),  # float32, the default dtype
    ("torch.full", ((4, 4), 1.0), {"dtype": torch.float16}, 32),
    ("torch.arange", (10**12,), {}, 8 * 10**12),
    ("torch.linspace", (0, 1, 10**9), {}, 4 * 10**9),
    ("torch.eye", (1000,), {}, 4 * 10**6),
    ("Tensor.repeat", (H, 1000, 1, 1), {}, 2048 * 1000),
    ("Tensor.expand", (H, 10**6, 8, 64), {}, 2048 * 10**6),
    ("Tensor.new_ones", (H, (10, 10)), {}, 400),
    ("Tensor.repeat_interleave", (H, 100), {}, 2048 * 100),
    ("operator.add", (torch.zeros(10**5, 1), torch.zeros(1, 10**5)), {}, 4 * 10**10),  # broadcasting
    ("operator.matmul", (torch.zeros(10**4, 1), torch.zeros(1, 10**4)), {}, 4 * 10**8),
    ("torch.outer", (torch.zeros(10**5), torch.zeros(10**5)), {}, 4 * 10**10),
    ("operator.mul", ([0], 10**10), {}, 8 * 10**10),
    ("builtins.list", (range(10**10),), {}, 72 * 10**10),  # a reference and a new int each
    ("operator.pow", (2, 10**9), {}, 125_000_001),  # a 125 MB Python integer
])
def test_predicted_bytes(name, args, kwargs, expected):
    assert predicted_bytes(name, args, kwargs) == expected


def test_reductions_and_einsum_are_sized_too():
    assert predicted_bytes("Tensor.mean", (H,), {}) == 4
    assert predicted_bytes("Tensor.mean", (H, -1), {}) == 8 * 4
    assert predicted_bytes("torch.einsum", ("ij->ji", torch.zeros(2, 3)), {}) == 24
    assert predicted_bytes("torch.einsum", ("i,j->ij", torch.zeros(4096), torch.zeros(4096)), {}) == 4 << 24


def test_check_allocation_names_the_op_and_the_limit():
    check_allocation("Tensor.repeat", (H, 2, 1, 1), {}, limit=8192, where="x.py:3")
    with pytest.raises(PolicyError, match=r"x\.py:3: torch\.ones would make a tensor of 4,398,046,511,104 bytes") as info:
        check_allocation("torch.ones", (1 << 40,), {}, limit=1 << 30, where="x.py:3")
    assert info.value.rule == "max_tensor_bytes"
    check_allocation("torch.ones", (1 << 40,), {}, limit=None, where="x.py:3")  # no limit: no check
