"""block_sparse_attention: every backend against the fp64 dense reference (outputs and dq, dk, dv),
compiled FlexAttention on CPU, torch.compile(fullgraph=True), boundary validation."""
from __future__ import annotations

import contextlib
import os
from unittest import mock

import pytest
import torch

from kandinsky_kernels import _ext
from kandinsky_kernels.backends import available_backends, use_backend
from kandinsky_kernels.mask import BlockSparseMask
from kandinsky_kernels.ops import block_sparse_attention as bsa_mod
from kandinsky_kernels.ops.block_sparse_attention import block_sparse_attention
from kandinsky_kernels.reference.attention import block_sparse_attention_reference
from conftest import assert_close_to_reference


def _implemented():
    return {
        "cpu": _ext.cpp_op("bsa_fwd") is not None,
        "triton": bsa_mod.HAS_TRITON,
    }


# The C++ backward has two schemes (a single pass over whole heads per thread, taken when the heads
# share out evenly over the threads, and a dQ pass plus a dK/dV pass): "cpu-fused" / "cpu-two-pass"
# force each.
_CPU_BWD = {"cpu-fused": "fused", "cpu-two-pass": "two_pass"}
HAS_CPU_KERNELS = "cpu" in available_backends("bsa", "cpu", _implemented())
CPU_BACKENDS = ["reference", *(_CPU_BWD if HAS_CPU_KERNELS else ())]


@contextlib.contextmanager
def _backend_scope(backend):
    """use_backend, with KANDINSKY_BSA_CPU_BWD set for the "cpu-*" variants."""
    scheme = _CPU_BWD.get(backend)
    with mock.patch.dict(os.environ, {"KANDINSKY_BSA_CPU_BWD": scheme} if scheme else {}):
        with use_backend("cpu" if scheme else backend):
            yield


def random_mask(b, h, nb, density, *, diagonal=True, bs=64, token_valid=None) -> BlockSparseMask:
    """Random per-row block choice at ``density`` (plus the diagonal), different per batch and head.
    density 0 with diagonal: one block per row; density 1: dense."""
    dense = torch.rand(b, h, nb, nb) < density
    if diagonal:
        dense |= torch.eye(nb, dtype=torch.bool)
    return BlockSparseMask.from_dense_blocks(dense, bs, token_valid=token_valid)


def qkv(b, s, h, d, dtype, scale=1.0):
    return [(torch.randn(b, s, h, d) * scale).to(dtype) for _ in range(3)]


def check(backend, q, k, v, mask, cu_seqlens=None, grad=True):
    """The kernel vs the fp64 reference, with plain torch at q's dtype as the error yardstick."""
    # detach() keeps the inputs' strides and storage offset (clone() would compact odd strides)
    leaves = [x.detach().requires_grad_(grad) for x in (q, k, v)]
    with _backend_scope(backend):
        out = block_sparse_attention(*leaves, mask, cu_seqlens=cu_seqlens)
    ref_in = [x.detach().double().requires_grad_(grad) for x in (q, k, v)]
    ref = block_sparse_attention_reference(*ref_in, mask, cu_seqlens=cu_seqlens)
    t_in = [x.detach().clone().requires_grad_(grad) for x in (q, k, v)]
    t_out = block_sparse_attention_reference(*t_in, mask, cu_seqlens=cu_seqlens, upcast=False)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close_to_reference(out, ref, t_out)
    if not grad:
        return out
    dout = torch.randn_like(ref)
    with _backend_scope(backend):
        grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, ref_in, dout)
    t_grads = torch.autograd.grad(t_out, t_in, dout.to(t_out.dtype))
    for name, g, rg, tg in zip(("dq", "dk", "dv"), grads, ref_grads, t_grads):
        assert_close_to_reference(g, rg, tg, grad=True, name=name)
    return out


# ---------------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("density", [0.0, 0.25, 1.0], ids=["one-block", "25pct", "dense"])
def test_densities_odd_blocks_per_head_masks(backend, density):
    # 5 blocks (odd), different masks for every (batch, head)
    b, h, nb, d = 2, 3, 5, 64
    q, k, v = qkv(b, nb * 64, h, d, torch.float32)
    check(backend, q, k, v, random_mask(b, h, nb, density))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cached_panel_buffers_carry_nothing_between_calls_cpu(dtype):
    """Packed panels of 4 MiB and more come from a cache (csrc/attention/common.h), so a call may get the
    previous call's buffer, stale data included: results must not depend on it. The same inputs before and
    after calls with other data (and another shape, whose 4.5 MiB panels reuse the first call's 6 MiB
    ones) give the same bits, forward and backward; the other shape matches the reference."""
    if not HAS_CPU_KERNELS:
        pytest.skip("compiled extension lacks the CPU attention kernels")
    mask = random_mask(1, 2, 64, 0.1)  # S = 4096, H = 2, D = 128: K^T tiles 4 MiB, rows (ld 144) 4.5 MiB

    def run(q, k, v):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        with use_backend("cpu"):
            out = block_sparse_attention(*leaves, mask)
            grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        return [out.detach(), *grads]

    q, k, v = qkv(1, 4096, 2, 128, dtype)
    first = run(q, k, v)
    run(*qkv(1, 4096, 2, 128, dtype, scale=30.0))
    check("cpu-two-pass", *qkv(1, 4096, 3, 96, dtype), random_mask(1, 3, 64, 0.1))  # K^T tiles 4.5 MiB
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, run(q, k, v)):
        assert torch.equal(a, b), f"{name} changed after other calls reused the panel buffers"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", [64, 128])
def test_low_precision(backend, dtype, d):
    q, k, v = qkv(1, 256, 2, d, dtype)
    check(backend, q, k, v, random_mask(1, 2, 4, 0.4))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("scale", [1.0, 4.0, 16.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_input_scales(backend, scale, dtype):
    q, k, v = qkv(1, 256, 2, 64, dtype, scale)
    check(backend, q, k, v, random_mask(1, 2, 4, 0.5))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [16, 80, 256])
def test_head_dims(backend, d, dtype):
    # D = 16, 80: D / 2 bf16 pairs not a multiple of 16 (the scalar edges of the pair transposes)
    q, k, v = qkv(1, 192, 2, d, dtype)
    check(backend, q, k, v, random_mask(1, 2, 3, 0.5))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bs", [32, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_block_sizes(backend, bs, dtype):
    q, k, v = qkv(1, 4 * bs, 2, 64, dtype)
    check(backend, q, k, v, random_mask(1, 2, 4, 0.5, bs=bs))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bs, nb", [(64, 19), (16, 70)], ids=["bs64-3chunks", "bs16-3chunks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_longer_than_a_chunk(backend, bs, nb, dtype):
    """The C++ kernels softmax 512 key columns at a time (8 blocks of 64, 32 of 16: the largest chunk)
    and run P @ V over a chunk at once: rows with more active blocks than that cross chunks (online
    rescale between them; a last chunk that is not full)."""
    q, k, v = qkv(1, nb * bs, 2, 32, dtype)
    check(backend, q, k, v, random_mask(1, 2, nb, 0.9, bs=bs))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["odd-token-stride", "odd-offset", "head-major"])
def test_bf16_strided_inputs(backend, layout):
    """Strides the bf16 dot-product path cannot read as pair words (an odd token stride, a storage
    offset of one element) take the conversion path; a head-major view takes the pair path."""
    s, h, d = 192, 2, 64

    def make():
        if layout == "head-major":
            return torch.randn(1, h, s, d).to(torch.bfloat16).transpose(1, 2)
        row = h * d + 1
        base = torch.randn(s * row + 2).to(torch.bfloat16)
        off = 1 if layout == "odd-offset" else 0
        stride = (s * row, row, d, 1) if layout == "odd-token-stride" else (s * h * d, h * d, d, 1)
        return base.as_strided((1, s, h, d), stride, off)

    q, k, v = make(), make(), make()
    check(backend, q, k, v, random_mask(1, h, 3, 0.5))


@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="C++ kernels not built")
@pytest.mark.parametrize("backend", list(_CPU_BWD))
@pytest.mark.parametrize("d", [64, 80])
def test_bf16_conversion_path(backend, d, monkeypatch):
    """KANDINSKY_BSA_CPU_BF16_DOT=0 sends pair-readable bf16 through the fp32 conversion path, the
    path builds without AVX512-BF16 always take: it must meet the same tolerance."""
    q, k, v = qkv(1, 256, 2, d, torch.bfloat16)
    mask = random_mask(1, 2, 4, 0.5)
    monkeypatch.setenv("KANDINSKY_BSA_CPU_BF16_DOT", "0")
    converted = check(backend, q, k, v, mask)
    monkeypatch.delenv("KANDINSKY_BSA_CPU_BF16_DOT")
    with _backend_scope(backend):
        default = block_sparse_attention(q, k, v, mask)
    # with the products compiled in, the two paths round differently: equal outputs would mean the
    # switch never reached the kernels
    assert torch.equal(default, converted) != (_ext.cpu_isa() in ("amx", "avx512_bf16"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "lengths",
    [[300], [100, 200], [64, 150, 70], [40, 128, 90, 150]],
    ids=["1-video", "2-videos", "3-videos", "4-videos"],
)
def test_cu_seqlens(backend, lengths):
    s = 448  # 7 blocks; the videos end short of S, so the tail tokens are padding
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    assert cu[-1] <= s
    q, k, v = qkv(1, s, 2, 64, torch.float32)
    out = check(backend, q, k, v, random_mask(1, 2, 7, 0.5), cu_seqlens=cu)
    assert (out[:, int(cu[-1]) :] == 0).all()  # tokens past the last video see nothing


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cu_seqlens_with_padding_bf16(backend):
    s = 384
    valid = torch.rand(1, s) > 0.2
    cu = torch.tensor([0, 130, 300, 384], dtype=torch.int32)
    q, k, v = qkv(1, s, 2, 64, torch.bfloat16)
    check(backend, q, k, v, random_mask(1, 2, 6, 0.5, token_valid=valid), cu_seqlens=cu)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_padded_grid_token_valid(backend):
    # Pad keys as fractal_flatten makes them: whole tile rows missing, and a fully padded block.
    b, h, nb = 2, 2, 6
    valid = torch.ones(b, nb * 64, dtype=torch.bool)
    valid[:, 40:64] = False
    valid[:, 200:256] = False
    valid[1, 320:] = False  # last block of batch 1 entirely pad
    q, k, v = qkv(b, nb * 64, h, 64, torch.float32)
    check(backend, q, k, v, random_mask(b, h, nb, 0.4, token_valid=valid))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_broadcast_mask_and_empty_rows(backend):
    # mask B = H = 1 broadcast over B=2, H=3; query block 1 has no key block, block 3 only pad keys
    nb = 4
    dense = torch.rand(1, 1, nb, nb) < 0.5
    dense[..., 1, :] = False
    dense[..., 3, :] = False
    dense[..., 3, 2] = True
    valid = torch.ones(1, nb * 64, dtype=torch.bool)
    valid[:, 128:192] = False
    mask = BlockSparseMask.from_dense_blocks(dense, token_valid=valid)
    q, k, v = qkv(2, nb * 64, 3, 64, torch.float32)
    out = check(backend, q, k, v, mask)
    assert (out[:, 64:128] == 0).all() and (out[:, 192:] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_inputs(backend):
    # (B, H, S, D) storage seen as (B, S, H, D), and a D-strided slice
    b, h, s, d = 1, 2, 192, 64
    q, k = (torch.randn(b, h, s, d).transpose(1, 2) for _ in range(2))
    v = torch.randn(b, s, h, 2 * d)[..., ::2]
    check(backend, q, k, v, random_mask(b, h, s // 64, 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton(triton_device, dtype):
    valid = torch.rand(1, 256) > 0.1
    cu = torch.tensor([0, 100, 256], dtype=torch.int32)
    q, k, v = (x.to(triton_device) for x in qkv(1, 256, 2, 64, dtype))
    mask = random_mask(1, 2, 4, 0.4, token_valid=valid).to(triton_device)
    check("triton", q, k, v, mask)
    check("triton", q, k, v, mask, cu_seqlens=cu.to(triton_device))


def test_cpu_backend_is_automatic_on_cpu():
    if not HAS_CPU_KERNELS:
        pytest.skip("the C++ extension with bsa_fwd is not built")
    assert bsa_mod._backend("cpu") == "cpu"


# ------------------------------------------------------------------------ FlexAttention / compile
@pytest.mark.parametrize("padded", [False, True], ids=["plain", "padded"])
def test_against_compiled_flex(padded):
    if not HAS_CPU_KERNELS:
        pytest.skip("the C++ extension with bsa_fwd is not built")
    from torch.nn.attention.flex_attention import flex_attention

    b, h, nb, d = 1, 2, 6, 64
    valid = (torch.rand(b, nb * 64) > 0.15) if padded else None
    mask = random_mask(b, h, nb, 0.3, token_valid=valid)
    q, k, v = qkv(b, nb * 64, h, d, torch.float32)
    flex = torch.compile(flex_attention, dynamic=False)
    f_out = flex(*(x.transpose(1, 2) for x in (q, k, v)), block_mask=mask.to_flex_block_mask())
    f_out = f_out.transpose(1, 2)
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), mask)
    with use_backend("cpu"):
        out = block_sparse_attention(q, k, v, mask)
    assert_close_to_reference(f_out, ref, name="flex")  # the oracle itself is right
    assert_close_to_reference(out, ref, f_out)


def test_torch_compile_fullgraph():
    if not HAS_CPU_KERNELS:
        pytest.skip("the C++ extension with bsa_fwd is not built")
    mask = random_mask(1, 2, 3, 0.5)
    cu = torch.tensor([0, 100, 192], dtype=torch.int32)

    def f(q, k, v):
        return (block_sparse_attention(q * 2.0, k, v, mask, cu_seqlens=cu) * v).sum()

    compiled = torch.compile(f, fullgraph=True)
    args = [torch.randn(1, 192, 2, 64, requires_grad=True) for _ in range(3)]
    loss = compiled(*args)
    grads = torch.autograd.grad(loss, args)
    args_e = [x.detach().clone().requires_grad_() for x in args]
    loss_e = f(*args_e)
    grads_e = torch.autograd.grad(loss_e, args_e)
    torch.testing.assert_close(loss, loss_e)
    for g, ge in zip(grads, grads_e):
        torch.testing.assert_close(g, ge)


# ------------------------------------------------------------------------------------ validation
def _ok():
    q = torch.randn(1, 128, 2, 64)
    return q, q.clone(), q.clone(), random_mask(1, 2, 2, 0.5)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: {**a, "k": torch.randn(1, 128, 2, 32)}, "share one"),
        (lambda a: {**a, "q": a["q"].double(), "k": a["k"].double(), "v": a["v"].double()}, "dtype"),
        (lambda a: {**a, "q": a["q"].half()}, "one dtype"),
        (lambda a: {**a, **{n: torch.randn(1, 128, 2, 24) for n in "qkv"}}, "multiple of 16"),
        (lambda a: {**a, **{n: torch.randn(1, 128, 2, 272) for n in "qkv"}}, "at most 256"),
        (lambda a: {**a, **{n: torch.randn(1, 100, 2, 64) for n in "qkv"}}, "not a multiple"),
        (lambda a: {**a, **{n: torch.randn(1, 192, 2, 64) for n in "qkv"}}, "does not fit"),
        (lambda a: {**a, **{n: torch.randn(1, 128, 3, 64) for n in "qkv"}}, "does not fit"),
        (lambda a: {**a, "mask": torch.ones(2, 2, dtype=torch.bool)}, "BlockSparseMask"),
        (lambda a: {**a, "cu_seqlens": torch.tensor([0, 128])}, "int32"),
        (lambda a: {**a, "cu_seqlens": torch.tensor([0, 90, 60], dtype=torch.int32)}, "non-decreasing"),
        (lambda a: {**a, "cu_seqlens": torch.tensor([0, 200], dtype=torch.int32)}, "end <= S"),
        (lambda a: {**a, **{n: torch.randn(2, 128, 2, 64) for n in "qkv"},
                    "cu_seqlens": torch.tensor([0, 128], dtype=torch.int32)}, "B == 1"),
    ],
)
def test_validation(mutate, match):
    q, k, v, mask = _ok()
    args = mutate({"q": q, "k": k, "v": v, "mask": mask, "cu_seqlens": None})
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(**args)


# --------------------------------------------------------------------------------- nabla_attention
@pytest.mark.parametrize("padded", [False, True], ids=["token-grid-tuple", "fractal-layout-padded"])
def test_nabla_attention(padded):
    from kandinsky_kernels.ops.nabla import nabla_attention
    from kandinsky_kernels.ops.fractal import FractalLayout
    from kandinsky_kernels.ops.nabla import nabla_block_mask
    from kandinsky_kernels.ops.sta import sta_block_mask

    layout = FractalLayout(t=2, h=12 if padded else 16, w=20 if padded else 24)
    grid = layout if padded else (layout.t, layout.h, layout.w)
    q, k, v = qkv(1, layout.seq_len, 2, 64, torch.float32)
    out, mask = nabla_attention(q, k, v, 0.8, sta_window=(3, 3, 3), grid=grid, return_mask=True)
    sta = sta_block_mask(layout.t, layout.h_tiles, layout.w_tiles, (3, 3, 3))
    tv = layout.token_valid() if padded else None
    expect = nabla_block_mask(q, k, 0.8, sta=sta, token_valid=tv)
    assert torch.equal(mask.to_dense_blocks(), expect.to_dense_blocks())
    assert (mask.token_valid is None) == (not padded)
    assert torch.equal(out, block_sparse_attention(q, k, v, mask))  # the mask is reusable (CFG)
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), expect)
    assert_close_to_reference(out, ref, block_sparse_attention_reference(q, k, v, expect, upcast=False))


def test_closed_form_reference_backward_matches_autograd():
    # The reference backward runs inside the backward custom op, where autograd is off, so it is
    # written out; it must equal autograd through the reference forward.
    from kandinsky_kernels.reference.attention import block_sparse_attention_backward_reference

    valid = torch.rand(1, 192) > 0.2
    mask = random_mask(1, 2, 3, 0.4, token_valid=valid)
    cu = torch.tensor([0, 70, 192], dtype=torch.int32)
    q, k, v = (x.double().requires_grad_() for x in qkv(1, 192, 2, 32, torch.float64))
    dout = torch.randn(1, 192, 2, 32, dtype=torch.float64)
    out = block_sparse_attention_reference(q, k, v, mask, cu_seqlens=cu)
    expected = torch.autograd.grad(out, (q, k, v), dout)
    got = block_sparse_attention_backward_reference(dout, q.detach(), k.detach(), v.detach(), mask, cu_seqlens=cu)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["plain", "padded-broadcast", "varlen"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_chunked_reference_matches_dense(case, dtype):
    # The memory-bounded oracle of the GPU tests and benchmarks (it runs at S = 93,696 there) must be
    # the dense reference exactly, with chunks that straddle blocks and a short last chunk.
    from kandinsky_kernels.reference.attention import (block_sparse_attention_chunked,
                                                       block_sparse_attention_with_lse)

    b, h, nb, bs = 2, 3, 5, 32
    s = nb * bs
    valid, cu = None, None
    if case == "padded-broadcast":
        valid = torch.rand(b, s) > 0.3
        valid[1, :bs] = False  # query block 0 of batch 1 sees nothing where its row holds only block 0
        dense = torch.zeros(1, 1, nb, nb, dtype=torch.bool)
        dense[..., 0, 0] = dense[..., 1:, :] = True
        mask = BlockSparseMask.from_dense_blocks(dense, bs, token_valid=valid)
    else:
        mask = random_mask(b, h, nb, 0.4, bs=bs)
        if case == "varlen":
            cu = torch.tensor([0, 50, 61, 130], dtype=torch.int32)  # tokens 130+ belong to no video
    q, k, v = qkv(b, s, h, 16, dtype, scale=4.0)
    upcast = dtype != torch.bfloat16
    want, want_lse = block_sparse_attention_with_lse(q, k, v, mask, 0.3, cu, upcast=upcast)
    got, got_lse = block_sparse_attention_chunked(q, k, v, mask, 0.3, cu, dtype=dtype, chunk=48)
    assert got.dtype == dtype and got.shape == q.shape and got_lse.shape == (b, h, s)
    empty = torch.isneginf(want_lse)
    assert torch.equal(torch.isneginf(got_lse), empty) and (case == "plain" or empty.any())
    assert not got.transpose(1, 2)[empty].any()
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got, want.to(dtype), **tol)
    torch.testing.assert_close(got_lse[~empty], want_lse[~empty], rtol=1e-6, atol=1e-6)


def test_reference_backend_through_the_custom_ops():
    # The reference backend runs inside the forward and backward custom ops (closed-form backward).
    q, k, v = (x.requires_grad_() for x in qkv(1, 128, 1, 32, torch.float32))
    mask = random_mask(1, 1, 2, 0.5)
    with use_backend("reference"):
        out = bsa_mod._fwd_op(q, k, v, mask.kv_ptr, mask.kv_cols, 64, 32**-0.5, None, None)[0]
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    ref = block_sparse_attention_reference(q, k, v, mask)
    expected = torch.autograd.grad(ref, (q, k, v), torch.ones_like(ref))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def test_flex_bwd_tile_clamp_helper(monkeypatch):
    """The Flex workaround used by the GPU tests and benchmarks clamps torch's backward heuristic tiles
    (dataclass configs) to the mask block, keeps other fields, and is idempotent."""
    import dataclasses

    choices = pytest.importorskip("torch._inductor.choices")
    from benchmarks.flex_compat import flex_bwd_heuristic_tiles_at_most

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        block_m1: int
        block_n1: int
        num_warps: int

    def fake(self, *args, **kwargs):
        return [Cfg(128, 64, 8), Cfg(32, 128, 4)]

    monkeypatch.setattr(choices.InductorChoices, "get_flex_attention_bwd_configs", fake, raising=False)
    flex_bwd_heuristic_tiles_at_most(64)
    flex_bwd_heuristic_tiles_at_most(64)  # second call: no double wrapping
    got = choices.InductorChoices.get_flex_attention_bwd_configs(None)
    assert got == [Cfg(64, 64, 8), Cfg(32, 64, 4)]
    assert choices.InductorChoices.get_flex_attention_bwd_configs._orig is fake


# ------------------------------------------------------------------- log-sum-exp and merging
def _oracle(q, k, v, mask, scale=None):
    """fp64 dense attention and its log-sum-exp, differentiable (every test row sees some key)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = mask.to_dense_tokens().expand(q.shape[0], q.shape[2], -1, -1)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1), v)
    return out, lse


def _lse_case(backend, dtype, d, device="cpu", only_lse=False):
    b, h, nb = 1, 2, 4
    q, k, v = (x.to(device) for x in qkv(b, nb * 64, h, d, dtype))
    mask = random_mask(b, h, nb, 0.4).to(device)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    with _backend_scope(backend):
        out, lse = block_sparse_attention(*leaves, mask, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (b, h, nb * 64)
    cpu = lambda x: x.detach().cpu()  # noqa: E731
    mask_c = mask.to("cpu")
    ref_in = [cpu(x).double().requires_grad_(True) for x in (q, k, v)]
    ref_out, ref_lse = _oracle(*ref_in, mask_c)
    t_in = [cpu(x).clone().requires_grad_(True) for x in (q, k, v)]
    t_out, t_lse = _oracle(*t_in, mask_c)  # plain torch at the input dtype: the error yardstick
    assert_close_to_reference(cpu(out), ref_out, t_out, name="out")
    assert_close_to_reference(cpu(lse), ref_lse, t_lse.float(), name="lse")
    go = torch.zeros_like(ref_out) if only_lse else torch.randn_like(ref_out)
    gl = torch.randn_like(ref_lse)
    outputs = (lse,) if only_lse else (out, lse)
    grads_in = (gl.float().to(device),) if only_lse else (go.to(dtype).to(device), gl.float().to(device))
    with _backend_scope(backend):
        grads = torch.autograd.grad(outputs, leaves, grads_in)
    ref_grads = torch.autograd.grad((ref_out, ref_lse), ref_in, (go, gl))
    t_grads = torch.autograd.grad((t_out, t_lse), t_in, (go.to(dtype), gl.to(t_lse.dtype)))
    for name, g, rg, tg in zip(("dq", "dk", "dv"), grads, ref_grads, t_grads):
        assert_close_to_reference(cpu(g), rg, tg, grad=True, name=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [64, 128])
def test_return_lse_and_its_gradient(backend, dtype, d):
    """lse (B, H, S) against the fp64 log-sum-exp, and gradients through out and lse together (dS gets
    P * dlse: every backend folds it into Delta)."""
    _lse_case(backend, dtype, d)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_through_lse_alone(backend):
    _lse_case(backend, torch.float32, 64, only_lse=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_return_lse_triton(triton_device, dtype):
    _lse_case("triton", dtype, 64, device=triton_device)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_merge_of_two_partial_attentions_equals_the_union(backend):
    """Key blocks split at random into two disjoint masks (some rows empty in one part): merging the
    two partial results equals attention over the union, output, lse and gradients."""
    from kandinsky_kernels import merge_attention

    b, h, nb, d = 1, 2, 6, 64
    q, k, v = qkv(b, nb * 64, h, d, torch.float32)
    union = torch.rand(b, h, nb, nb) < 0.6
    union |= torch.eye(nb, dtype=torch.bool)
    part = torch.rand(b, h, nb, nb) < 0.5
    part[0, 0, 0] = True  # row 0 of head 0 lies wholly in part a: b is empty there
    ma = BlockSparseMask.from_dense_blocks(union & part)
    mb = BlockSparseMask.from_dense_blocks(union & ~part)
    mu = BlockSparseMask.from_dense_blocks(union)
    go = torch.randn(b, nb * 64, h, d)
    gl = torch.randn(b, h, nb * 64)
    results = []
    for split in (True, False):
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
        with _backend_scope(backend):
            if split:
                oa, la = block_sparse_attention(*leaves, ma, return_lse=True)
                ob, lb = block_sparse_attention(*leaves, mb, return_lse=True)
                assert torch.isneginf(lb[0, 0, :64]).all()
                out, lse = merge_attention(oa, la, ob, lb)
            else:
                out, lse = block_sparse_attention(*leaves, mu, return_lse=True)
            grads = torch.autograd.grad((out, lse), leaves, (go, gl))
        results.append((out, lse, *grads))
    for name, a, u in zip(("out", "lse", "dq", "dk", "dv"), *results):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, u, rtol=2e-5, atol=2e-5, msg=name)


def test_merge_attention_rows_empty_in_both_and_errors():
    from kandinsky_kernels import merge_attention

    o = torch.zeros(1, 2, 1, 16, requires_grad=True)
    lse = torch.full((1, 1, 2), float("-inf"), requires_grad=True)
    out, lse_m = merge_attention(o, lse, o, lse)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse_m).all()
    (out.sum() + lse_m.clamp(min=-1).sum()).backward()
    assert torch.isfinite(o.grad).all() and torch.isfinite(lse.grad).all()
    with pytest.raises(ValueError, match="lse_a must have shape"):
        merge_attention(o, lse[..., :1], o, lse)
    with pytest.raises(ValueError, match="out_b has shape"):
        merge_attention(o, lse, o[:, :1], lse)
    with pytest.raises(ValueError, match="return_lse"):
        block_sparse_attention(*qkv(1, 64, 1, 16, torch.float32), BlockSparseMask.from_dense_blocks(
            torch.ones(1, 1, 1, 1, dtype=torch.bool)), return_lse=1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1), (8, 1)], ids=["mha", "gqa2", "mqa4", "mqa8"])
def test_gqa_mqa_against_the_fp64_reference(backend, hq, hkv):
    """k, v with H_kv heads: query head h reads kv head h // (H_q / H_kv); dk, dv sum over the group."""
    b, nb, d = 1, 3, 64
    q = torch.randn(b, nb * 64, hq, d)
    k, v = torch.randn(b, nb * 64, hkv, d), torch.randn(b, nb * 64, hkv, d)
    mask = random_mask(b, hq, nb, 0.5)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    with _backend_scope(backend):
        out = block_sparse_attention(*leaves, mask)
    g = hq // hkv
    ref_in = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    ref = block_sparse_attention_reference(
        ref_in[0], ref_in[1].repeat_interleave(g, 2), ref_in[2].repeat_interleave(g, 2), mask)
    t_in = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]  # plain torch: the yardstick
    t_out = block_sparse_attention_reference(
        t_in[0], t_in[1].repeat_interleave(g, 2), t_in[2].repeat_interleave(g, 2), mask, upcast=False)
    assert_close_to_reference(out, ref, t_out)
    dout = torch.randn_like(ref)
    with _backend_scope(backend):
        grads = torch.autograd.grad(out, leaves, dout.float())
    ref_grads = torch.autograd.grad(ref, ref_in, dout)
    t_grads = torch.autograd.grad(t_out, t_in, dout.float())
    for name, gr, rg, tg in zip(("dq", "dk", "dv"), grads, ref_grads, t_grads):
        assert gr.shape == rg.shape
        assert_close_to_reference(gr, rg, tg, grad=True, name=name)


def test_gqa_shape_errors():
    q = torch.randn(1, 64, 4, 16)
    mask = BlockSparseMask.from_dense_blocks(torch.ones(1, 1, 1, 1, dtype=torch.bool))
    for k, v in [(torch.randn(1, 64, 3, 16), torch.randn(1, 64, 3, 16)),   # 3 does not divide 4
                 (torch.randn(1, 64, 2, 16), torch.randn(1, 64, 1, 16)),   # k and v differ
                 ]:
        with pytest.raises(ValueError, match="H_kv dividing H_q"):
            block_sparse_attention(q, k, v, mask)
    k = torch.randn(1, 128, 2, 16)  # Sk != Sq needs a mask with Sk / block_size key blocks
    with pytest.raises(ValueError, match=r"need Nq = Sq / block_size = 1, Nk = Sk / block_size = 2"):
        block_sparse_attention(q, k, k, mask)


# ------------------------------------------------------------------ Sq != Sk: rectangular masks
def _joint_case(nq, nk_sparse, text, where, hq=2, hkv=2, b=1, dtype=torch.float32, device="cpu"):
    """Video queries (nq blocks) over a sparse video part (nk_sparse blocks) plus ``text`` dense keys
    (padded to whole blocks, the pad marked invalid), as MMDiT-style joint attention needs."""
    sparse = torch.rand(b, hq, nq, nk_sparse) < 0.4
    sparse[..., 0] = True
    mask = BlockSparseMask.from_dense_blocks(sparse).with_dense_keys(text, where=where)
    sk = mask.num_kv_blocks * 64
    q = torch.randn(b, nq * 64, hq, 64).to(dtype)
    k, v = (torch.randn(b, sk, hkv, 64).to(dtype) for _ in range(2))
    return (x.to(device) for x in (q, k, v)), mask.to(device)


def _check_gqa(backend, q, k, v, mask):
    g = q.shape[2] // k.shape[2]
    if g == 1:
        return check(backend, q, k, v, mask)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    with _backend_scope(backend):
        out = block_sparse_attention(*leaves, mask)
    exp = lambda xs: (xs[0], xs[1].repeat_interleave(g, 2), xs[2].repeat_interleave(g, 2))  # noqa: E731
    ref_in = [x.detach().cpu().double().requires_grad_(True) for x in (q, k, v)]
    ref = block_sparse_attention_reference(*exp(ref_in), mask.to("cpu"))
    t_in = [x.detach().cpu().clone().requires_grad_(True) for x in (q, k, v)]
    t_out = block_sparse_attention_reference(*exp(t_in), mask.to("cpu"), upcast=False)
    assert_close_to_reference(out.cpu(), ref, t_out)
    dout = torch.randn_like(ref)
    with _backend_scope(backend):
        grads = torch.autograd.grad(out, leaves, dout.to(out.dtype).to(out.device))
    for name, gr, rg, tg in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, ref_in, dout),
                                torch.autograd.grad(t_out, t_in, dout.to(t_out.dtype))):
        assert gr.shape == rg.shape
        assert_close_to_reference(gr.cpu(), rg, tg, grad=True, name=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("nq,nk,text,where", [(4, 4, 37, "after"), (3, 5, 64, "before"), (5, 2, 100, "after")],
                         ids=["text-after", "text-before-more-keys", "fewer-keys"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rectangular_mask_with_dense_text_keys(backend, nq, nk, text, where, dtype):
    """Sq != Sk: a sparse video part and a dense text part every query sees (pad keys of the last text
    block never attended), against the fp64 reference, out and dq, dk, dv."""
    (q, k, v), mask = _joint_case(nq, nk, text, where, dtype=dtype)
    assert mask.shape[-2:] == (nq, nk + -(-text // 64))
    check(backend, q, k, v, mask)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("hq,hkv", [(4, 2), (8, 1)], ids=["gqa2", "mqa8"])
def test_rectangular_mask_with_gqa(backend, hq, hkv):
    (q, k, v), mask = _joint_case(3, 4, 50, "after", hq=hq, hkv=hkv, b=2)
    _check_gqa(backend, q, k, v, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rectangular_mask_triton(triton_device, dtype):
    (q, k, v), mask = _joint_case(3, 2, 40, "after", dtype=dtype, device=triton_device)
    check("triton", q, k, v, mask)


def test_with_dense_keys_and_rectangular_errors():
    m = BlockSparseMask.from_dense_blocks(torch.eye(3, dtype=torch.bool)[None, None])
    j = m.with_dense_keys(70)  # two text blocks, 58 pad keys
    assert j.shape == (1, 1, 3, 5) and j.to_dense_blocks()[0, 0, :, 3:].all()
    assert j.token_valid.shape == (1, 320) and int(j.token_valid.sum()) == 3 * 64 + 70
    before = m.with_dense_keys(64, where="before")
    assert before.to_dense_blocks()[0, 0, :, 0].all() and before.token_valid.all()
    for bad, match in [(0, "num_tokens"), (1.5, "num_tokens")]:
        with pytest.raises(ValueError, match=match):
            m.with_dense_keys(bad)
    with pytest.raises(ValueError, match="where"):
        m.with_dense_keys(4, where="middle")
    q = torch.randn(1, 192, 1, 16)
    kv = torch.randn(1, 320, 1, 16)
    with pytest.raises(ValueError, match="Sq == Sk"):
        block_sparse_attention(q, kv, kv, j, cu_seqlens=torch.tensor([0, 100, 192], dtype=torch.int32))


def _check_varlen_qk(backend, q, k, v, mask, cu_q, cu_k):
    """cu_seqlens_q / cu_seqlens_k against the fp64 reference (given the stacked offsets)."""
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    with _backend_scope(backend):
        out = block_sparse_attention(*leaves, mask, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    pair = torch.stack([cu_q, cu_k]).cpu()
    ref_in = [x.detach().cpu().double().requires_grad_(True) for x in (q, k, v)]
    ref = block_sparse_attention_reference(*ref_in, mask.to("cpu"), cu_seqlens=pair)
    t_in = [x.detach().cpu().clone().requires_grad_(True) for x in (q, k, v)]
    t_out = block_sparse_attention_reference(*t_in, mask.to("cpu"), cu_seqlens=pair, upcast=False)
    assert_close_to_reference(out.cpu(), ref, t_out)
    dout = torch.randn_like(ref)
    with _backend_scope(backend):
        grads = torch.autograd.grad(out, leaves, dout.to(out.dtype).to(out.device))
    for name, gr, rg, tg in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, ref_in, dout),
                                torch.autograd.grad(t_out, t_in, dout.to(t_out.dtype))):
        assert_close_to_reference(gr.cpu(), rg, tg, grad=True, name=name)
    return out


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lq,lk", [([150], [40]), ([100, 60, 32], [40, 150, 70]), ([20, 90, 1, 70], [64, 3, 100, 60])],
                         ids=["1-video", "3-videos", "4-videos"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_varlen_cu_seqlens_q_and_k(backend, lq, lk, dtype):
    """Videos packed apart on the query and key sides (Sq != Sk, unequal lengths, ragged tails past
    the last offset): query token i of video a sees only video a's keys, within the block mask."""
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32)
    nq, nk = -(-int(cu_q[-1]) // 64) + 1, -(-int(cu_k[-1]) // 64)
    dense = torch.rand(1, 2, nq, nk) < 0.7
    dense[..., 0] = True
    mask = BlockSparseMask.from_dense_blocks(dense)
    q = torch.randn(1, nq * 64, 2, 64).to(dtype)
    k, v = (torch.randn(1, nk * 64, 2, 64).to(dtype) for _ in range(2))
    out = _check_varlen_qk(backend, q, k, v, mask, cu_q, cu_k)
    assert (out[0, int(cu_q[-1]):] == 0).all(), "queries past the last video see nothing"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_varlen_cu_seqlens_q_and_k_triton(triton_device, dtype):
    cu_q = torch.tensor([0, 100, 160, 192], dtype=torch.int32)
    cu_k = torch.tensor([0, 40, 190, 260], dtype=torch.int32)
    mask = BlockSparseMask.from_dense_blocks(torch.ones(1, 2, 3, 5, dtype=torch.bool)).to(triton_device)
    q = torch.randn(1, 192, 2, 64).to(dtype).to(triton_device)
    k, v = (torch.randn(1, 320, 2, 64).to(dtype).to(triton_device) for _ in range(2))
    _check_varlen_qk("triton", q, k, v, mask, cu_q.to(triton_device), cu_k.to(triton_device))


def test_varlen_argument_errors():
    q = torch.randn(1, 128, 1, 16)
    k = torch.randn(1, 192, 1, 16)
    mask = BlockSparseMask.from_dense_blocks(torch.ones(1, 1, 2, 3, dtype=torch.bool))
    cq, ck = torch.tensor([0, 100], dtype=torch.int32), torch.tensor([0, 150], dtype=torch.int32)
    with pytest.raises(ValueError, match="go together"):
        block_sparse_attention(q, k, k, mask, cu_seqlens_q=cq)
    with pytest.raises(ValueError, match="not both"):
        block_sparse_attention(q, k, k, mask, cu_seqlens=torch.tensor([0, 128], dtype=torch.int32), cu_seqlens_q=cq,
                               cu_seqlens_k=ck)
    with pytest.raises(ValueError, match="same number of videos"):
        block_sparse_attention(q, k, k, mask, cu_seqlens_q=cq, cu_seqlens_k=torch.tensor([0, 5, 150],
                                                                                         dtype=torch.int32))
    for backend in CPU_BACKENDS:
        with _backend_scope(backend), pytest.raises(ValueError, match=r"cu_seqlens_k must start at 0.*S=192"):
            block_sparse_attention(q, k, k, mask, cu_seqlens_q=cq, cu_seqlens_k=torch.tensor([0, 200], dtype=torch.int32))


# ------------------------------------------------------------------------- block-size contract
@pytest.mark.parametrize("bs", [8, 48, 96, 256])
def test_block_size_contract_is_one_error_on_every_backend(bs):
    """One contract, block_size in (16, 32, 64, 128), raised at the boundary with the same message on
    every backend (before any kernel). (nabla_block_mask, a mask builder, takes any block size.)"""
    q = torch.randn(1, 2 * 256, 1, 16)
    mask = BlockSparseMask.from_dense_blocks(torch.ones(1, 1, 512 // bs, 512 // bs, dtype=torch.bool), bs)
    messages = set()
    for backend in [*CPU_BACKENDS, *(["triton"] if bsa_mod.HAS_TRITON else [])]:
        with _backend_scope(backend), pytest.raises(ValueError, match=r"must be one of \(16, 32, 64, 128\)") as e:
            block_sparse_attention(q, q, q, mask)
        messages.add(str(e.value))
    assert len(messages) == 1, messages


@pytest.mark.parametrize("bs", [16, 32])
def test_triton_small_blocks(triton_device, bs):
    """The Triton kernels clamp their tiles to 16- and 32-token blocks (forward and backward)."""
    q, k, v = (x.to(triton_device) for x in qkv(1, 6 * bs, 2, 32, torch.float32))
    check("triton", q, k, v, random_mask(1, 2, 6, 0.4, bs=bs).to(triton_device))


def test_torch_compile_fullgraph_rectangular_varlen_gqa_lse():
    """Sq != Sk, per-side offsets, GQA and lse in one compiled graph (fake shapes: lse (B, H, Sq),
    dk and dv shaped like k), equal to eager."""
    if not HAS_CPU_KERNELS:
        pytest.skip("the C++ extension with bsa_fwd is not built")
    mask = BlockSparseMask.from_dense_blocks(torch.rand(1, 4, 3, 2) < 0.6).with_dense_keys(40)
    cu_q = torch.tensor([0, 100, 192], dtype=torch.int32)
    cu_k = torch.tensor([0, 90, 168], dtype=torch.int32)

    def f(q, k, v):
        out, lse = block_sparse_attention(q * 2.0, k, v, mask, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                          return_lse=True)
        return (out * q).sum() + lse.clamp(min=-30).sum()

    compiled = torch.compile(f, fullgraph=True)
    args = [torch.randn(1, 192, 4, 32, requires_grad=True), torch.randn(1, 192, 2, 32, requires_grad=True),
            torch.randn(1, 192, 2, 32, requires_grad=True)]
    loss = compiled(*args)
    grads = torch.autograd.grad(loss, args)
    args_e = [x.detach().clone().requires_grad_() for x in args]
    loss_e = f(*args_e)
    grads_e = torch.autograd.grad(loss_e, args_e)
    torch.testing.assert_close(loss, loss_e)
    for g, ge in zip(grads, grads_e):
        assert g.shape == ge.shape
        torch.testing.assert_close(g, ge)
