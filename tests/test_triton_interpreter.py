"""The premises of testing Triton kernels on CPU through the interpreter (see tests/conftest.py): the
fp32 -> bf16 conversion rounds to nearest even, bit for bit as torch (and a GPU) does, for an implicit
store, ``.to(tl.bfloat16)`` and ``.to(tl.bfloat16, fp_downcast_rounding="rtne")``; "rtz" still
truncates."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import HAS_CUDA, INTERPRETER_BF16_RNE

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from kandinsky_kernels import _triton  # noqa: E402

pytestmark = [
    pytest.mark.skipif(HAS_CUDA, reason="the kernels run on the GPU, not through the interpreter"),
    pytest.mark.skipif(not HAS_CUDA and not _triton.triton_runs_on("cpu"),
                       reason=_triton.why_not("cpu") if not HAS_CUDA else ""),
]


@triton.jit
def _store_bf16(x_ptr, y_ptr, n, MODE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    if MODE == 0:
        y = x  # implicit conversion by the store
    elif MODE == 1:
        y = x.to(tl.bfloat16)
    elif MODE == 2:
        y = x.to(tl.bfloat16, fp_downcast_rounding="rtne")
    else:
        y = x.to(tl.bfloat16, fp_downcast_rounding="rtz")
    tl.store(y_ptr + offs, y, mask=offs < n)


def _hard_values() -> torch.Tensor:
    one = torch.tensor(1.0).view(torch.int32).item()
    big = torch.tensor(3.3895e38).view(torch.int32).item()
    bits = [
        one + 0x8000,  # a tie, even below: stays 1.0
        one + 0x18000,  # a tie, odd below: rounds up
        one + 0x8001, one + 0x7FFF,  # just above / below half
        one | 0x7F8000,  # a tie that carries into the exponent: 2.0
        big, 0x7F7FFFFF,  # near the largest float: rounds to bf16's max / to inf
        0x00000001, 0x00018000, 0x807FFFFF,  # subnormals (and a negative one)
    ]
    special = torch.from_numpy(np.array(bits, dtype=np.uint32).view(np.float32))
    special = special[torch.isfinite(special)]
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(4000, generator=g) * torch.logspace(-30, 30, 4000)
    return torch.cat([special, -special, rand, torch.tensor([0.0, -0.0, float("inf"), -float("inf")])])


@pytest.mark.parametrize("mode", [0, 1, 2], ids=["store", "to", "to_rtne"])
def test_interpreter_rounds_bf16_like_torch(mode):
    assert INTERPRETER_BF16_RNE, "tests/conftest.py could not patch this triton's interpreter"
    x = _hard_values()
    y = torch.empty(x.numel(), dtype=torch.bfloat16)
    _store_bf16[(1,)](x, y, x.numel(), MODE=mode, BLOCK=triton.next_power_of_2(x.numel()))
    want = x.to(torch.bfloat16)
    diff = (y.view(torch.int16) != want.view(torch.int16)).nonzero().flatten()
    assert diff.numel() == 0, (
        f"{diff.numel()} of {x.numel()} values rounded differently, e.g. {x[diff[:4]].tolist()} -> "
        f"{y[diff[:4]].tolist()}, torch: {want[diff[:4]].tolist()}")


def test_interpreter_nan_stays_nan_and_rtz_truncates():
    x = torch.tensor([float("nan"), 1.0 + 2.0 ** -8 + 2.0 ** -10, -(1.0 + 2.0 ** -8 + 2.0 ** -10)])
    y = torch.empty(3, dtype=torch.bfloat16)
    _store_bf16[(1,)](x, y, 3, MODE=1, BLOCK=4)
    assert torch.isnan(y[0])
    _store_bf16[(1,)](x, y, 3, MODE=3, BLOCK=4)
    assert torch.isnan(y[0]) and y[1].item() == 1.0 and y[2].item() == -1.0
