"""GPU checks of the Triton block-sparse attention kernels at realistic shapes (skipped without CUDA).

Two oracles: the fp32 reference computed in query chunks (``block_sparse_attention_chunked``: exact,
memory-bounded), with plain torch at the kernel dtype as the error yardstick of the tolerance policy;
and compiled FlexAttention on the identical ``BlockMask`` (the official Kandinsky kernel), whose error
must be matched within the policy's factor. The main bf16 cases run through autotuning; the variant
cases (padding, packed segments, fp16) and the atomic backward scheme use the fixed default tile so the
run stays short (the atomic scheme's autotuning runs in benchmarks/gpu_timing.py).
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_close_to_reference
from kandinsky_kernels.mask import BlockSparseMask
from kandinsky_kernels.reference.attention import block_sparse_attention_chunked as chunked_reference

pytestmark = pytest.mark.gpu
BS = 64
FLEX_OPTS = (
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 64, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 64},
    {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32},
)


def _bsa():
    from kandinsky_kernels.ops import _bsa_triton

    return _bsa_triton


@pytest.fixture
def no_autotune(monkeypatch):
    monkeypatch.setattr(_bsa(), "_AUTOTUNE", False)


def _mask(b, h, s, density, seed=0, token_valid=None):
    """Random per-head block mask with about ``density`` active blocks per row (diagonal always on)."""
    n = s // BS
    g = torch.Generator(device="cuda").manual_seed(seed)
    keep = torch.rand(b, h, n, n, device="cuda", generator=g) < density
    keep |= torch.eye(n, dtype=torch.bool, device="cuda")
    return BlockSparseMask.from_dense_blocks(keep, BS, token_valid=token_valid)


def _dense_autograd(q, k, v, mask, scale, dtype, do):
    """Gradients of dense masked attention in ``dtype`` (materialises S x S per head: small S only)."""
    ins = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    allowed = mask.to_dense_tokens()  # pad keys (mask.token_valid) removed
    logits = torch.einsum("bqhd,bkhd->bhqk", ins[0], ins[1]) * scale
    logits = logits.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(logits.float(), -1).nan_to_num(0.0).to(dtype)
    out = torch.einsum("bhqk,bkhd->bqhd", p, ins[2])
    out.backward(do.to(dtype))
    return [t.grad for t in ins]


def _flex(q, k, v, mask, scale):
    """Compiled FlexAttention on the same pattern, BSHD in and out (autograd-capable)."""
    from torch.nn.attention.flex_attention import flex_attention

    from benchmarks.flex_compat import flex_bwd_heuristic_tiles_at_most

    flex_bwd_heuristic_tiles_at_most(BS)
    fn = _flex.compiled = getattr(_flex, "compiled", None) or torch.compile(flex_attention, dynamic=False)
    bm = mask.to_flex_block_mask()
    t = [x.transpose(1, 2) for x in (q, k, v)]
    # Flex's sm90 default tiles (128) do not divide 64-token blocks: force 64 tiles, smaller if those fail.
    try:
        return fn(*t, block_mask=bm, scale=scale, kernel_options=FLEX_OPTS[0]).transpose(1, 2)
    except Exception:
        return fn(*t, block_mask=bm, scale=scale, kernel_options=FLEX_OPTS[1]).transpose(1, 2)


def _run(q, k, v, mask, scale, cu=None):
    return _bsa().bsa_forward_triton(q, k, v, mask.kv_ptr, mask.kv_cols, BS, scale,
                                     mask.token_valid, cu)


@pytest.mark.parametrize("s,h,d,density", [(16384, 4, 64, 0.05), (8192, 8, 128, 0.25)])
def test_forward_realistic_bf16(s, h, d, density):
    q, k, v = (torch.randn(1, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = _mask(1, h, s, density)
    scale = 1.0 / math.sqrt(d)
    out, lse = _run(q, k, v, mask, scale)
    ref, ref_lse = chunked_reference(q, k, v, mask, scale, dtype=torch.float32)
    plain, _ = chunked_reference(q, k, v, mask, scale, dtype=torch.bfloat16)
    assert_close_to_reference(out, ref, plain, name="out vs fp32 reference")
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=0)
    with torch.no_grad():
        flex = _flex(q, k, v, mask, scale)
    assert_close_to_reference(out, ref, flex, name="out vs flex")


@pytest.mark.parametrize("scheme", ["two_pass", "atomic"])
@pytest.mark.parametrize("d", [64, 128])
def test_backward_bf16_vs_reference_and_flex(d, scheme, monkeypatch):
    if scheme == "atomic":
        monkeypatch.setattr(_bsa(), "_AUTOTUNE", False)
    s, h = 4096, 4
    q, k, v = (torch.randn(1, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    do = torch.randn_like(q)
    mask = _mask(1, h, s, 0.15)
    t = mask.transpose()
    scale = 1.0 / math.sqrt(d)
    out, lse = _run(q, k, v, mask, scale)
    grads = _bsa().bsa_backward_triton(do, q, k, v, out, lse, mask.kv_ptr, mask.kv_cols,
                                       t.kv_ptr, t.kv_cols, BS, scale, None, None, scheme=scheme)
    ref = _dense_autograd(q, k, v, mask, scale, torch.float32, do)
    plain = _dense_autograd(q, k, v, mask, scale, torch.bfloat16, do)
    for name, g, r, p in zip(("dq", "dk", "dv"), grads, ref, plain):
        assert_close_to_reference(g, r, p, grad=True, name=f"{name} vs fp32 reference")
    ins = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    _flex(*ins, mask, scale).backward(do)
    for name, g, r, f in zip(("dq", "dk", "dv"), grads, ref, ins):
        assert_close_to_reference(g, r, f.grad, grad=True, name=f"{name} vs flex")


@pytest.mark.parametrize("scheme", ["two_pass", "atomic"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_padding_and_broadcast_mask(no_autotune, dtype, scheme):
    b, s, h, d = 2, 4096, 4, 128
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=dtype) for _ in range(3))
    token_valid = torch.ones(b, s, dtype=torch.bool, device="cuda")
    token_valid[0, s - 100:] = False
    token_valid[1, 1000:1100] = False
    mask = _mask(1, 1, s, 0.2, token_valid=token_valid)  # (1, 1, Nq, Nk): broadcast over batch and heads
    scale = 0.1
    out, lse = _run(q, k, v, mask, scale)
    ref, _ = chunked_reference(q, k, v, mask, scale, dtype=torch.float32)
    plain, _ = chunked_reference(q, k, v, mask, scale, dtype=dtype)
    assert_close_to_reference(out, ref, plain)
    do = torch.randn_like(q)
    t = mask.transpose()
    grads = _bsa().bsa_backward_triton(do, q, k, v, out, lse, mask.kv_ptr, mask.kv_cols,
                                       t.kv_ptr, t.kv_cols, BS, scale, token_valid, None,
                                       scheme=scheme)
    ref_g = _dense_autograd(q, k, v, mask, scale, torch.float32, do)
    plain_g = _dense_autograd(q, k, v, mask, scale, dtype, do)
    for name, g, r, p in zip(("dq", "dk", "dv"), grads, ref_g, plain_g):
        assert_close_to_reference(g, r, p, grad=True, name=name)
    assert torch.equal(grads[1][0, s - 100:], torch.zeros_like(grads[1][0, s - 100:]))


@pytest.mark.parametrize("scheme", ["two_pass", "atomic"])
def test_varlen_segments(no_autotune, scheme):
    s, h, d = 4096, 4, 64
    cu = torch.tensor([0, 1000, 2500, 4000], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(1, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = _mask(1, h, s, 0.3)
    scale = 1.0 / math.sqrt(d)
    out, lse = _run(q, k, v, mask, scale, cu)
    ref, ref_lse = chunked_reference(q, k, v, mask, scale, cu, dtype=torch.float32)
    plain, _ = chunked_reference(q, k, v, mask, scale, cu, dtype=torch.bfloat16)
    assert_close_to_reference(out, ref, plain)
    assert torch.equal(out[0, 4000:], torch.zeros_like(out[0, 4000:]))
    assert torch.isneginf(lse[0, :, 4000:]).all()
    do = torch.randn_like(q)
    t = mask.transpose()
    grads = _bsa().bsa_backward_triton(do, q, k, v, out, lse, mask.kv_ptr, mask.kv_cols,
                                       t.kv_ptr, t.kv_cols, BS, scale, None, cu, scheme=scheme)
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][0, 4000:], torch.zeros_like(grads[0][0, 4000:]))


def test_fp32_exact_dots(no_autotune):
    """fp32 inputs use ieee dots (not tf32): the error must stay at fp32 level."""
    s, h, d = 1024, 2, 64
    q, k, v = (torch.randn(1, s, h, d, device="cuda") for _ in range(3))
    mask = _mask(1, h, s, 0.3)
    out, _ = _run(q, k, v, mask, 0.125)
    ref, _ = chunked_reference(q, k, v, mask, 0.125, dtype=torch.float64)
    plain, _ = chunked_reference(q, k, v, mask, 0.125, dtype=torch.float32)
    assert_close_to_reference(out, ref, plain)
