"""Every ISA path of the C++ attention kernels against the fp64 reference, on any machine that can run it.

One portable build carries the paths amx, avx512_bf16, avx512, avx2 and baseline; the kernels pick the
fastest the CPU runs, and ``KANDINSKY_CPU_ISA`` (read at every call) forces one. Each path runs the
same sweep: fp32 / bf16 / fp16, head dims with and without a half-tile K tail, block sizes 16-128, both
backward schemes, packed videos with padding, strided bf16. A path this CPU cannot run is skipped with
the extension's reason (e.g. AMX on the AMD machines).
"""
from __future__ import annotations

import pytest
import torch

from kandinsky_kernels import _ext
from test_block_sparse_attention import HAS_CPU_KERNELS, check, qkv, random_mask

pytestmark = pytest.mark.skipif(not HAS_CPU_KERNELS, reason="C++ kernels not built")


def _why_not(isa: str) -> str | None:
    op = _ext.cpp_op("cpu_isa_report")
    if op is None:
        return "the extension has no ISA dispatch"
    for line in op():
        name, why = line.split(": ", 1)
        if name == isa:
            return None if why == "ok" else why
    return f"unknown path {isa}"


@pytest.fixture(params=_ext.CPU_ISAS)
def isa(request, monkeypatch):
    why = _why_not(request.param)
    if why is not None:
        pytest.skip(f"{request.param}: {why}")
    monkeypatch.setenv("KANDINSKY_CPU_ISA", request.param)
    assert _ext.cpu_isa() == request.param
    return request.param


SCHEMES = ["cpu-fused", "cpu-two-pass"]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("d", [16, 80, 128])
def test_dtypes_head_dims(isa, scheme, dtype, d):
    # D = 80: 40 bf16 pair steps, a half AMX tile past two full ones; D = 16: a half tile only
    q, k, v = qkv(2, 320, 3, d, dtype)
    check(scheme, q, k, v, random_mask(2, 3, 5, 0.4))


@pytest.mark.parametrize("bs", [16, 32, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_block_sizes(isa, bs, dtype):
    q, k, v = qkv(1, 6 * bs, 2, 64, dtype)
    check("cpu-fused", q, k, v, random_mask(1, 2, 6, 0.5, bs=bs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_large_inputs_long_rows(isa, dtype):
    # scale 16: scores ~1e3, the lse split into hi + lo matters; 19 blocks: rows span 3 softmax chunks
    q, k, v = qkv(1, 19 * 64, 2, 64, dtype, scale=16.0)
    check("cpu-two-pass", q, k, v, random_mask(1, 2, 19, 1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_videos_with_padding(isa, dtype):
    cu = torch.tensor([0, 100, 250, 400], dtype=torch.int32)
    q, k, v = qkv(1, 448, 2, 64, dtype)
    out = check("cpu-fused", q, k, v, random_mask(1, 2, 7, 0.6), cu_seqlens=cu)
    assert (out[:, 400:] == 0).all()


def test_bf16_strided(isa):
    # a head-major view: pair-readable strides, rows 2 * D apart for one head
    base = torch.randn(1, 2, 256, 64).to(torch.bfloat16)
    q, k, v = (base.clone().transpose(1, 2) for _ in range(3))
    check("cpu-fused", q, k, v, random_mask(1, 2, 4, 0.5))


def test_bf16_products_reach_the_kernels(isa, monkeypatch):
    """On the paths with bf16 products, bf16 rounds differently from the conversion path (so the path
    switch reaches the kernels); elsewhere the two are the same code."""
    q, k, v = qkv(1, 512, 2, 64, torch.bfloat16)
    mask = random_mask(1, 2, 8, 0.5)
    from kandinsky_kernels.backends import use_backend
    from kandinsky_kernels.ops.block_sparse_attention import block_sparse_attention

    with use_backend("cpu"):
        default = block_sparse_attention(q, k, v, mask)
        monkeypatch.setenv("KANDINSKY_BSA_CPU_BF16_DOT", "0")
        converted = block_sparse_attention(q, k, v, mask)
    assert torch.equal(default, converted) != (isa in ("amx", "avx512_bf16"))


def test_unknown_or_unavailable_path_raises(monkeypatch):
    monkeypatch.setenv("KANDINSKY_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="not a path; expected auto, amx"):
        _ext.cpu_isa()
    missing = [i for i in _ext.CPU_ISAS if _why_not(i) is not None]
    if missing:
        monkeypatch.setenv("KANDINSKY_CPU_ISA", missing[0])
        with pytest.raises(RuntimeError, match="cannot run here"):
            _ext.cpu_isa()
    monkeypatch.setenv("KANDINSKY_CPU_ISA", "auto")
    assert _ext.cpu_isa() == _ext.cpu_isas()[0]
