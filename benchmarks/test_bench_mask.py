"""The block-sparse mask: what one layer's mask holds, and the transpose every backward builds first.

Case 1, Kandinsky 5 Pro's shape: S = 93,696 tokens (1,464 blocks of 64), H = 32 heads, a random
pattern of 146 key blocks a row (10 % density). Baseline ``dense table``: the FlexAttention-style
``(B, H, Nq, Nk)`` int32 index table plus counts, the form the library kept before, and its
transpose built through a dense bool mask (what the Triton backward did). ``ours``: compressed rows
(int64 row pointers, int16 ids) and the transpose built by the C++ counting sort. Times: building
the transpose from the forward mask (3 rounds: the baseline takes seconds a round). Memory: what the
mask and its transpose hold (the bytes of their tensors, exact, not a peak; the table's from its
shape). Goal: ours <= 0.15x of the dense table. Inside ``torch.compile`` the library's masks carry
every pair's room (see :mod:`kandinsky_kernels.mask`), so this goal is an eager one.

Case 2, the attention suite's shape (S = 8,192, H = 4, D = 128, fp32, 10 %, the same random
pattern): the transpose build against the attention backward it serves (the C++ backward, given the
transpose). Goal: the transpose costs < 2 % of the backward (>= 50x faster). Both grow with the
number of active blocks (the backward by block_size^2 x D a pair, the transpose by one id), so the
share carries over to Pro's S.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks._util import Provider, by_profile, cpu_isa_now, run_case, skip_cpu_suite_in_gpu_profile
from kandinsky_kernels import BlockSparseMask, _ext
from kandinsky_kernels.backends import use_backend
from kandinsky_kernels.mask import _compact, _ptr_from_counts, _transpose_csr
from kandinsky_kernels.ops import block_sparse_attention as bsa_ops

skip_cpu_suite_in_gpu_profile()

BS = 64
ROUNDS = by_profile(smoke=1, quick=3, default=5)
PRO_ROUNDS = by_profile(smoke=1, quick=2, default=3)  # the dense baseline takes seconds a round
# (S, H) of case 1: Pro's shape except in the smoke profile
PRO = by_profile(smoke=(4096, 2), quick=(93_696, 32), default=(93_696, 32))
ATTN = by_profile(smoke=(1024, 2, 64), quick=(4096, 4, 128), default=(8192, 4, 128))
DENSITY = 0.10
_WHY_NO_CPP = None if _ext.cpp_op("bsa_mask_transpose") is not None else "the C++ extension is not built"


def _random_csr(s: int, h: int) -> BlockSparseMask:
    """A (1, h, N, N) mask with round(N * 10 %) key blocks a row, distinct and ascending, built
    straight into compressed rows (no (N, N) tensor): a strided pattern shifted per row at random."""
    n = s // BS
    per_row = max(1, round(n * DENSITY))
    stride = n // per_row
    g = torch.Generator().manual_seed(s + h)
    shift = torch.randint(0, stride, (h * n, 1), generator=g)
    cols = (torch.arange(per_row) * stride + shift).reshape(-1).to(torch.int16)
    ptr = _ptr_from_counts(torch.full((1, h, n), per_row, dtype=torch.int64))
    return BlockSparseMask.from_csr(ptr, cols, n, BS)


def _held(*tensors: torch.Tensor) -> int:
    return sum(t.nbytes for t in tensors)


def test_mask_memory_and_transpose_at_pro_shape(benchmark):
    s, h = PRO
    mask = _random_csr(s, h)
    n = mask.num_q_blocks
    ptr, cols = mask.kv_ptr, mask.kv_cols
    dense = mask.to_dense_blocks()  # the pattern, for the baseline only

    def dense_transpose():
        return _compact(dense.transpose(-1, -2))

    def ours():
        return _transpose_csr(ptr, cols, n)

    # the table and its transpose: int32 (1, H, N) counts and (1, H, N, N) ids each (4 bytes an entry)
    table_held = 2 * 4 * (h * n + h * n * n)
    ours_held = mask.nbytes + (0 if _WHY_NO_CPP else _held(*ours()))
    run_case(
        benchmark, suite="block_sparse_mask", op="mask + transpose",
        case=f"Pro shape S={s} H={h} blocks of {BS} density={mask.density:.1%}", baseline="dense table",
        providers=[
            Provider("dense table", dense_transpose, held=lambda: table_held),
            Provider("ours[cpu]", ours, skip=_WHY_NO_CPP, held=lambda: ours_held, cpu_isa=cpu_isa_now()[0]),
        ],
        params={"seq_len": s, "heads": h, "density": mask.density, "nnz": mask.nnz},
        mem_goal={"provider": "ours[cpu]", "vs": "dense table", "max_ratio": 0.15,
                  "what": "memory held (mask + transpose)"},
        rounds=PRO_ROUNDS, warmup_rounds=0,
    )


def test_transpose_share_of_the_attention_backward(benchmark):
    s, h, d = ATTN
    if _WHY_NO_CPP or _ext.cpp_op("bsa_bwd") is None:
        pytest.skip("the C++ extension is not built")
    mask = _random_csr(s, h)
    g = torch.Generator().manual_seed(d)
    q, k, v, dout = (torch.randn(1, s, h, d, generator=g) for _ in range(4))
    scale = d ** -0.5
    with use_backend("cpu"):
        out, lse, tag = bsa_ops._fwd_op(q, k, v, mask.kv_ptr, mask.kv_cols, BS, scale, None, None)
    q_ptr, q_cols = _transpose_csr(mask.kv_ptr, mask.kv_cols, mask.num_kv_blocks)

    def backward():
        return bsa_ops._bwd_op(dout, q, k, v, out, lse, mask.kv_ptr, mask.kv_cols, q_ptr, q_cols, BS, scale,
                               None, None, tag)

    def transpose():
        return _transpose_csr(mask.kv_ptr, mask.kv_cols, mask.num_kv_blocks)

    isa = cpu_isa_now()[0]
    run_case(
        benchmark, suite="block_sparse_mask", op="transpose vs backward",
        case=f"S={s} H={h} D={d} fp32 density={mask.density:.0%}", baseline="attention backward",
        providers=[Provider("attention backward", backward, cpu_isa=isa),
                   Provider("ours[cpu] transpose", transpose, cpu_isa=isa)],
        params={"seq_len": s, "heads": h, "head_dim": d, "density": mask.density},
        goals=[{"provider": "ours[cpu] transpose", "vs": "attention backward", "min_speedup": 50.0}],
        rounds=ROUNDS,
    )
