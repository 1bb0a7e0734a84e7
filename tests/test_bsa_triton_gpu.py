"""GPU checks of the Triton block-sparse attention kernels at realistic shapes (skipped without CUDA).

Two oracles: a dense fp32 masked reference computed in query chunks (exact, memory-bounded), with plain
torch at the kernel dtype as the error yardstick of the tolerance policy; and compiled FlexAttention on
the identical ``BlockMask`` (the official Kandinsky kernel), whose error must be matched within the
policy's factor. The main bf16 cases run through autotuning; the variant cases (padding, packed
segments, fp16) and the atomic backward scheme use the fixed default tile so the run stays short (the
atomic scheme's autotuning runs in benchmarks/gpu_timing.py).
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_close_to_reference
from kandinsky_kernels.mask import BlockSparseMask

pytestmark = pytest.mark.gpu
BS = 64
FLEX_OPTS = (
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 64, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 64},
    {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32},
)


def _bsa():
    from kandinsky_kernels.ops import block_sparse_attention

    return block_sparse_attention


@pytest.fixture
def no_autotune(monkeypatch):
    monkeypatch.setattr(_bsa(), "_AUTOTUNE", False)


def _mask(b, h, s, density, seed=0):
    """Random per-head block mask with about ``density`` active blocks per row (diagonal always on)."""
    n = s // BS
    g = torch.Generator(device="cuda").manual_seed(seed)
    keep = torch.rand(b, h, n, n, device="cuda", generator=g) < density
    keep |= torch.eye(n, dtype=torch.bool, device="cuda")
    return BlockSparseMask.from_dense_blocks(keep, BS)


def _segments(s, cu):
    seg = torch.full((s,), -1, device="cuda")
    for i in range(len(cu) - 1):
        seg[cu[i]: cu[i + 1]] = i
    return seg


@torch.no_grad()
def _chunked_reference(q, k, v, mask, scale, *, dtype, token_valid=None, cu=None, chunk=2048):
    """Dense masked attention computed in ``dtype`` one (head, query chunk) at a time: out, lse."""
    b, s, h, d = q.shape
    blocks = mask.to_dense_blocks()
    out = torch.empty(b, s, h, d, dtype=dtype, device=q.device)
    lse = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
    seg = None if cu is None else _segments(s, cu)
    for bi in range(b):
        for hi in range(h):
            kk = k[bi, :, hi].to(dtype)
            vv = v[bi, :, hi].to(dtype)
            blk = blocks[bi if blocks.shape[0] > 1 else 0, hi if blocks.shape[1] > 1 else 0]
            for c0 in range(0, s, chunk):
                qq = q[bi, c0:c0 + chunk, hi].to(dtype)
                allowed = blk[c0 // BS:(c0 + chunk) // BS].repeat_interleave(BS, 0).repeat_interleave(BS, 1)
                if token_valid is not None:
                    allowed = allowed & token_valid[bi][None, :]
                if seg is not None:
                    sq = seg[c0:c0 + chunk]
                    allowed = allowed & (sq[:, None] == seg[None, :]) & (sq[:, None] >= 0)
                logits = (qq @ kk.T) * scale
                logits = logits.masked_fill(~allowed, float("-inf"))
                row_lse = torch.logsumexp(logits.float(), -1)
                p = torch.softmax(logits, -1).nan_to_num(0.0)
                out[bi, c0:c0 + chunk, hi] = p @ vv
                lse[bi, hi, c0:c0 + chunk] = row_lse
    return out, lse


def _dense_autograd(q, k, v, mask, scale, dtype, do, token_valid=None):
    """Gradients of dense masked attention in ``dtype`` (materialises S x S per head: small S only)."""
    ins = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    allowed = mask.to_dense_tokens()
    if token_valid is not None:
        allowed = allowed & token_valid[:, None, None, :]
    logits = torch.einsum("bqhd,bkhd->bhqk", ins[0], ins[1]) * scale
    logits = logits.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(logits.float(), -1).nan_to_num(0.0).to(dtype)
    out = torch.einsum("bhqk,bkhd->bqhd", p, ins[2])
    out.backward(do.to(dtype))
    return [t.grad for t in ins]


def _flex(q, k, v, mask, scale):
    """Compiled FlexAttention on the same pattern, BSHD in and out (autograd-capable)."""
    from torch.nn.attention.flex_attention import flex_attention

    from kandinsky_kernels._flex_compat import flex_bwd_heuristic_tiles_at_most

    flex_bwd_heuristic_tiles_at_most(BS)
    fn = _flex.compiled = getattr(_flex, "compiled", None) or torch.compile(flex_attention, dynamic=False)
    bm = mask.to_flex_block_mask()
    t = [x.transpose(1, 2) for x in (q, k, v)]
    # Flex's sm90 default tiles (128) do not divide 64-token blocks: force 64 tiles, smaller if those fail.
    try:
        return fn(*t, block_mask=bm, scale=scale, kernel_options=FLEX_OPTS[0]).transpose(1, 2)
    except Exception:
        return fn(*t, block_mask=bm, scale=scale, kernel_options=FLEX_OPTS[1]).transpose(1, 2)


def _run(q, k, v, mask, scale, token_valid=None, cu=None):
    bsa = _bsa()
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")
    return bsa.bsa_forward_triton(q, k, v, mask.kv_num_blocks, mask.kv_indices, BS, scale, token_valid, cu_t)


@pytest.mark.parametrize("s,h,d,density", [(16384, 4, 64, 0.05), (8192, 8, 128, 0.25)])
def test_forward_realistic_bf16(s, h, d, density):
    q, k, v = (torch.randn(1, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = _mask(1, h, s, density)
    scale = 1.0 / math.sqrt(d)
    out, lse = _run(q, k, v, mask, scale)
    ref, ref_lse = _chunked_reference(q, k, v, mask, scale, dtype=torch.float32)
    plain, _ = _chunked_reference(q, k, v, mask, scale, dtype=torch.bfloat16)
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
    grads = _bsa().bsa_backward_triton(do, q, k, v, out, lse, mask.kv_num_blocks, mask.kv_indices,
                                       t.kv_num_blocks, t.kv_indices, BS, scale, None, None, scheme=scheme)
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
    mask = _mask(1, 1, s, 0.2)  # (1, 1, Nq, Nk): broadcast over batch and heads
    scale = 0.1
    out, lse = _run(q, k, v, mask, scale, token_valid)
    ref, _ = _chunked_reference(q, k, v, mask, scale, dtype=torch.float32, token_valid=token_valid)
    plain, _ = _chunked_reference(q, k, v, mask, scale, dtype=dtype, token_valid=token_valid)
    assert_close_to_reference(out, ref, plain)
    do = torch.randn_like(q)
    t = mask.transpose()
    grads = _bsa().bsa_backward_triton(do, q, k, v, out, lse, mask.kv_num_blocks, mask.kv_indices,
                                       t.kv_num_blocks, t.kv_indices, BS, scale, token_valid, None,
                                       scheme=scheme)
    ref_g = _dense_autograd(q, k, v, mask, scale, torch.float32, do, token_valid)
    plain_g = _dense_autograd(q, k, v, mask, scale, dtype, do, token_valid)
    for name, g, r, p in zip(("dq", "dk", "dv"), grads, ref_g, plain_g):
        assert_close_to_reference(g, r, p, grad=True, name=name)
    assert torch.equal(grads[1][0, s - 100:], torch.zeros_like(grads[1][0, s - 100:]))


@pytest.mark.parametrize("scheme", ["two_pass", "atomic"])
def test_varlen_segments(no_autotune, scheme):
    s, h, d = 4096, 4, 64
    cu = [0, 1000, 2500, 4000]
    q, k, v = (torch.randn(1, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = _mask(1, h, s, 0.3)
    scale = 1.0 / math.sqrt(d)
    out, lse = _run(q, k, v, mask, scale, cu=cu)
    ref, ref_lse = _chunked_reference(q, k, v, mask, scale, dtype=torch.float32, cu=cu)
    plain, _ = _chunked_reference(q, k, v, mask, scale, dtype=torch.bfloat16, cu=cu)
    assert_close_to_reference(out, ref, plain)
    assert torch.equal(out[0, 4000:], torch.zeros_like(out[0, 4000:]))
    assert torch.isneginf(lse[0, :, 4000:]).all()
    do = torch.randn_like(q)
    t = mask.transpose()
    cu_t = torch.tensor(cu, dtype=torch.int32, device="cuda")
    grads = _bsa().bsa_backward_triton(do, q, k, v, out, lse, mask.kv_num_blocks, mask.kv_indices,
                                       t.kv_num_blocks, t.kv_indices, BS, scale, None, cu_t, scheme=scheme)
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][0, 4000:], torch.zeros_like(grads[0][0, 4000:]))


def test_fp32_exact_dots(no_autotune):
    """fp32 inputs use ieee dots (not tf32): the error must stay at fp32 level."""
    s, h, d = 1024, 2, 64
    q, k, v = (torch.randn(1, s, h, d, device="cuda") for _ in range(3))
    mask = _mask(1, h, s, 0.3)
    out, _ = _run(q, k, v, mask, 0.125)
    ref, _ = _chunked_reference(q.double(), k.double(), v.double(), mask, 0.125, dtype=torch.float64)
    plain, _ = _chunked_reference(q, k, v, mask, 0.125, dtype=torch.float32)
    assert_close_to_reference(out, ref, plain)
