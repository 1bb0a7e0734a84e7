"""Raster-order tokens through the public API: ``nabla_attention(order="raster")`` and
``block_sparse_attention(token_index=)`` read q, k, v and write the output through the fractal index.

Contract, every backend: the result equals the fractal-order call on ``fractal_flatten``-ed inputs,
unflattened, bit for bit (outputs, lse and the gradients of q, k and v): the kernels compute the same
products in the same order, only the rows they read and write move. The kernel-level tests of the
index (every ISA path, both backward schemes, dlse) are in ``test_token_index_cpp.py`` and
``test_token_index_triton.py``.
"""
from __future__ import annotations

import pytest
import torch
from conftest import backend_and_device, assert_exact

from kandinsky_kernels import (
    BlockSparseMask,
    FractalLayout,
    _ext,
    block_sparse_attention,
    fractal_flatten,
    fractal_unflatten,
    nabla_attention,
    use_backend,
)


@pytest.fixture(params=["reference", "cpu", "triton"])
def backend(request):
    """(backend name, device) for every backend that can run here."""
    return backend_and_device(request, "bsa_fwd")


def _raster_qkv(b, grid, h, d, dtype=torch.float32, device="cpu"):
    t, hh, ww = grid
    return [torch.randn(b, t * hh * ww, h, d, dtype=dtype, device=device) for _ in range(3)]


def _flat(x, grid):
    b, _, h, d = x.shape
    return fractal_flatten(x.reshape(b, *grid, h, d))


def _unflat(y, grid):
    b, _, h, d = y.shape
    return fractal_unflatten(y, FractalLayout(*grid)).reshape(b, -1, h, d)


# ------------------------------------------------------------------------------------ the index
@pytest.mark.parametrize("grid,tile", [((2, 10, 13), 4), ((1, 16, 16), 8), ((3, 5, 7), 8), ((2, 9, 24), 8)])
def test_token_index_is_the_fractal_permutation(grid, tile):
    layout = FractalLayout(*grid, tile=tile)
    index = layout.token_index()
    assert index.dtype == torch.int64 and index.shape == (layout.seq_len,)
    rows = torch.arange(1, grid[0] * grid[1] * grid[2] + 1, dtype=torch.int64).reshape(1, *grid, 1)
    flat = fractal_flatten(rows, tile=tile)[0, :, 0] - 1  # padding flattens to 0 - 1 = -1
    assert_exact(index, flat, "token_index")
    assert_exact(index >= 0, layout.token_valid(), "padding positions")


# ------------------------------------------------------------------- nabla_attention(order="raster")
@pytest.mark.parametrize("grid", [(2, 12, 20), (2, 16, 16)])
def test_raster_nabla_attention_equals_the_fractal_call(backend, grid):
    name, device = backend
    q, k, v = (x.to(device) for x in _raster_qkv(2, grid, 2, 32))
    dout = torch.randn_like(q)
    res = []
    for raster in (True, False):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        with use_backend(name):
            if raster:
                out = nabla_attention(*x, 0.7, (3, 3, 3), grid=grid, order="raster")
            else:
                out = _unflat(nabla_attention(*(_flat(t, grid) for t in x), 0.7, (3, 3, 3), grid=grid), grid)
        res.append((out.detach(), torch.autograd.grad(out, x, dout)))
    (a, ga), (b, gb) = res
    assert_exact(a, b, "out")
    for x, y, n in zip(ga, gb, "qkv"):
        assert_exact(x, y, f"d{n}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_raster_nabla_attention_low_precision_cpu(dtype):
    """bf16 runs the bf16-product paths (AVX512-BF16 / AMX where the CPU has them): same contract."""
    if _ext.cpp_op("bsa_fwd") is None:
        pytest.skip(f"compiled kernels not available ({_ext.EXT_ERROR})")
    grid = (2, 12, 20)
    q, k, v = _raster_qkv(1, grid, 2, 64, dtype)
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    y = [t.clone().requires_grad_() for t in (q, k, v)]
    with use_backend("cpu"):
        a = nabla_attention(*x, 0.8, (3, 3, 3), grid=grid, order="raster")
        b = _unflat(nabla_attention(*(_flat(t, grid) for t in y), 0.8, (3, 3, 3), grid=grid), grid)
    assert_exact(a, b, "out")
    dout = torch.randn_like(a)
    for gx, gy, n in zip(torch.autograd.grad(a, x, dout), torch.autograd.grad(b, y, dout), "qkv"):
        assert_exact(gx, gy, f"d{n}")


def test_raster_mask_reused_through_block_sparse_attention(backend):
    """return_mask gives the mask in fractal positions; block_sparse_attention(token_index=) reuses it
    on the raster tensors (the CFG branch), with lse in positions."""
    name, device = backend
    grid = (2, 12, 20)
    layout = FractalLayout(*grid)
    q, k, v = (x.to(device) for x in _raster_qkv(1, grid, 2, 32))
    with use_backend(name):
        out, mask = nabla_attention(q, k, v, 0.7, (3, 3, 3), grid=layout, order="raster", return_mask=True)
        assert mask.shape == (1, 2, layout.num_blocks, layout.num_blocks)
        again, lse = block_sparse_attention(q, k, v, mask, token_index=layout.token_index(device), return_lse=True)
        ref, ref_lse = block_sparse_attention(*(_flat(t, grid) for t in (q, k, v)), mask, return_lse=True)
    assert_exact(again, out, "out again")
    assert_exact(again, _unflat(ref, grid), "out against the fractal call")
    assert_exact(lse, ref_lse, "lse (positions)")


def test_token_index_lse_gradient_matches(backend):
    """The gradient of lse (ring / context-parallel merging) flows through the index too."""
    name, device = backend
    grid = (2, 8, 12)
    layout = FractalLayout(*grid, tile=4)
    n = layout.num_blocks
    dense = (torch.rand(1, 2, n, n) < 0.5) | torch.eye(n, dtype=torch.bool)
    mask = BlockSparseMask.from_dense_blocks(dense.to(device), 16, token_valid=layout.token_valid(device))
    q, k, v = (x.to(device) for x in _raster_qkv(1, grid, 2, 16))
    flat = lambda t: fractal_flatten(t.reshape(1, *grid, 2, 16), tile=4)  # noqa: E731
    res = []
    for raster in (True, False):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        with use_backend(name):
            if raster:
                out, lse = block_sparse_attention(*x, mask, token_index=layout.token_index(device), return_lse=True)
            else:
                out, lse = block_sparse_attention(*(flat(t) for t in x), mask, return_lse=True)
                out = fractal_unflatten(out, layout).reshape(q.shape)
        loss = out.square().sum() + torch.where(torch.isfinite(lse), lse, 0).sum()
        res.append((out.detach(), lse.detach(), torch.autograd.grad(loss, x)))
    assert_exact(res[0][0], res[1][0], "out")
    assert_exact(res[0][1], res[1][1], "lse")
    for a, b, n in zip(res[0][2], res[1][2], "qkv"):
        assert_exact(a, b, f"d{n}")


def test_raster_index_cached_in_inference_mode_serves_training():
    """The per-layout index is cached: one first built under inference_mode must still be savable for a
    backward (an inference tensor is not)."""
    from kandinsky_kernels.ops.nabla import _cached_token_index

    _cached_token_index.cache_clear()
    grid = (2, 9, 11)
    q, k, v = _raster_qkv(1, grid, 2, 32)
    with torch.inference_mode():
        nabla_attention(q, k, v, 0.7, (1, 3, 3), grid=grid, order="raster")
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    out = nabla_attention(*x, 0.7, (1, 3, 3), grid=grid, order="raster")
    out.sum().backward()
    assert all(t.grad is not None for t in x)


def test_raster_nabla_attention_compiles_without_graph_breaks():
    import torch._dynamo.testing
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def fn(x5):  # the grid from the input's shape, as a model's hook reads it
        b, t, h, w, _ = x5.shape
        x = x5.reshape(b, t * h * w, 2, 32)
        return nabla_attention(x, x * 0.5, x.flip(-1), 0.7, (3, 3, 3), grid=(t, h, w), order="raster")

    compiled = torch.compile(fn, backend=counter, dynamic=True, fullgraph=True)
    for grid in [(2, 12, 20), (2, 16, 24), (3, 20, 12)]:
        x = torch.randn(1, *grid, 64, requires_grad=True)
        y = x.detach().clone().requires_grad_()
        out, ref = compiled(x), fn(y)
        assert_exact(out, ref, f"out {grid}")
        assert_exact(torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(ref.sum(), y)[0], f"dx {grid}")
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times for 3 grids"
    assert not counters["graph_break"]


# ------------------------------------------------------------------------------------- errors
def _err_case(case):
    grid = (2, 12, 20)
    q, k, v = _raster_qkv(1, grid, 2, 32)
    kw = dict(grid=grid, order="raster")
    if case == "order":
        kw["order"] = "zorder"
    elif case == "no grid":
        kw["grid"] = None
    elif case == "cu_seqlens":
        kw["cu_seqlens"] = torch.tensor([0, 480], dtype=torch.int32)
    elif case == "grid does not fit":
        kw["grid"] = (2, 12, 21)
    elif case == "bhsd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return (q, k, v), kw


@pytest.mark.parametrize("case,match", [
    ("order", "order must be 'fractal' or 'raster'"),
    ("no grid", r"order='raster'\) needs grid"),
    ("cu_seqlens", "not cu_seqlens"),
    ("grid does not fit", r"holds T\*H\*W = 2\*12\*21 = 504 raster tokens, but q has S=480"),
    ("bhsd", r"looks like \(B, H, S, D\)"),
])
def test_raster_nabla_attention_errors(case, match):
    (q, k, v), kw = _err_case(case)
    with pytest.raises(ValueError, match=match):
        nabla_attention(q, k, v, 0.7, (3, 3, 3), **kw)


def _bad_index(case, layout):
    index = layout.token_index()
    if case == "dtype":
        return index.int()
    if case == "2-D":
        return index[None]
    if case == "length":
        return index[:-64]
    if case == "partial block":
        return index[:-16]
    if case == "out of range":
        index = index.clone()
        index[3] = 10_000
        return index
    if case == "repeated":
        index = index.clone()
        index[index == 5] = 4
        return index
    if case == "missing":
        index = index.clone()
        index[index == 5] = -1
        return index
    raise AssertionError(case)


@pytest.mark.parametrize("case,match", [
    ("dtype", "token_index must have dtype in \\(int64\\)"),
    ("2-D", "token_index must have 1 dims"),
    ("length", "does not fit token_index's Sf=704 positions"),
    ("partial block", "token_index holds Sf=752 positions, not a multiple of the mask block_size=64"),
    ("out of range", r"token_index must hold rows in \[0, 480\)"),
    ("repeated", "1 rows are missing and 1 repeated"),
    ("missing", "1 rows are missing and 0 repeated"),
])
def test_block_sparse_attention_refuses_a_bad_token_index(backend, case, match):
    name, device = backend
    layout = FractalLayout(2, 12, 20)
    q, k, v = (x.to(device) for x in _raster_qkv(1, (2, 12, 20), 2, 32))
    n = layout.num_blocks
    mask = BlockSparseMask.from_dense_blocks(torch.ones(1, 1, n, n, dtype=torch.bool, device=device), 64)
    index = _bad_index(case, layout).to(device)
    with use_backend(name), pytest.raises(ValueError, match=match):
        block_sparse_attention(q, k, v, mask, token_index=index)


def test_token_index_needs_self_attention():
    layout = FractalLayout(2, 12, 20)
    q, k, v = _raster_qkv(1, (2, 12, 20), 2, 32)
    n = layout.num_blocks
    mask = BlockSparseMask.from_dense_blocks(torch.ones(1, 1, n, n, dtype=torch.bool), 64)
    with pytest.raises(ValueError, match="one index \\(self-attention\\)"):
        block_sparse_attention(q, k[:, :-1], v[:, :-1], mask, token_index=layout.token_index())
