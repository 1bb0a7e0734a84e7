"""token_index on the Triton kernels (block-sparse attention forward/backward, NABLA pooling) and the
NABLA mask written straight into compressed rows.

Result contract (notes: token_index spec): calling a kernel with raster tensors (B, Sr, H, D) and
``token_index`` equals calling it without an index on the gathered tensors ``xf[:, valid] =
x[:, token_index[valid]]`` (zeros at -1 positions, token_valid AND-ed with ``token_index >= 0``) and
scattering the results back; lse is identical. In the interpreter (fp32) that is bit-exact: both runs
compute the same products in the same order, only the rows are addressed differently. On a GPU the
atomic backward's dQ sums in a run-dependent order, so only there it is compared with a tight tolerance.

The NABLA mask kernel now counts each row, takes the row pointers from the prefix sums and recomputes
the rows to store their ids: the result must equal the dense-table compression it replaced, which is
what the C++ op and the reference (compressed with ``BlockSparseMask.from_dense_blocks``) give.
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_exact

from kandinsky_kernels import _ext
from kandinsky_kernels.mask import BlockSparseMask
from kandinsky_kernels.ops.sta import sta_block_mask


def _bsa():
    from kandinsky_kernels.ops import _bsa_triton

    return _bsa_triton


def _nabla():
    from kandinsky_kernels.ops import nabla

    return nabla


def _index(sr, sf, pads_at_end=False):
    """int64 (sf,): every row 0..sr-1 exactly once at random positions, -1 elsewhere (sf - sr pads)."""
    idx = torch.full((sf,), -1, dtype=torch.int64)
    pos = torch.arange(sr) if pads_at_end else torch.randperm(sf)[:sr]
    idx[pos] = torch.randperm(sr)
    return idx


def _gather(x, idx):
    """(B, Sr, ...) raster -> (B, Sf, ...) positions, zeros at -1."""
    valid = idx >= 0
    xf = x.new_zeros(x.shape[0], idx.numel(), *x.shape[2:])
    xf[:, valid] = x[:, idx[valid]]
    return xf


def _scatter(xf, idx, sr):
    """(B, Sf, ...) positions -> (B, Sr, ...) raster; NaN where nothing lands (there must be none)."""
    valid = idx >= 0
    x = xf.new_full((xf.shape[0], sr, *xf.shape[2:]), float("nan"))
    x[:, idx[valid]] = xf[:, valid]
    return x


def _folded_valid(token_valid, idx, b):
    """token_valid AND token_index >= 0, as the gathered call needs it (None where nothing is masked)."""
    real = idx >= 0
    if token_valid is None:
        return None if bool(real.all()) else real.expand(b, -1).contiguous()
    return (token_valid.reshape(-1, idx.numel()) & real).expand(b, -1).contiguous()


def _same(out, ref, name, exact=True):
    if exact:
        assert_exact(out.cpu(), ref.cpu(), name)
    else:
        torch.testing.assert_close(out.cpu(), ref.cpu(), rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------- block-sparse attention
# (block size, Sr, Sf, B, H, D, mask (Bm, Hm), token_valid shape or None, cu_seqlens or None, pads at end)
_CASES = {
    "bs16-pads": (16, 40, 64, 2, 2, 16, (2, 2), None, None, False),
    "bs16-nopads-valid-broadcast": (16, 64, 64, 2, 2, 16, (1, 1), (2, 64), None, False),
    "bs16-pads-valid-headmask": (16, 50, 64, 2, 2, 16, (1, 2), (2, 64), None, False),
    "bs16-varlen-pads-valid": (16, 56, 96, 1, 2, 16, (1, 2), (96,), [0, 40, 90], False),
    "bs16-d48-strided": (16, 48, 64, 2, 1, 48, (2, 1), (1, 64), None, True),
    "bs64-pads-valid": (64, 100, 128, 2, 1, 16, (2, 1), (1, 128), None, False),
    "bs64-nopads-broadcast": (64, 128, 128, 2, 1, 16, (1, 1), None, None, False),
}


def _mask(bm, hm, n, bs):
    blocks = torch.rand(bm, hm, n, n) < 0.5
    blocks |= torch.eye(n, dtype=torch.bool)
    blocks[0, 0, n - 1] = False  # a query block that sees nothing
    return BlockSparseMask.from_dense_blocks(blocks, bs)


@pytest.mark.parametrize("scheme", ["two_pass", "atomic"])
@pytest.mark.parametrize("case", list(_CASES))
def test_attention_with_index_equals_gathered(triton_device, case, scheme):
    bs, sr, sf, b, h, d, (bm, hm), tv_shape, cu, pads_at_end = _CASES[case]
    bsa = _bsa()
    dev = triton_device
    idx = _index(sr, sf, pads_at_end)
    if case.endswith("strided"):
        q, k, v = torch.randn(b, sr, 3, h, d).unbind(2)  # non-contiguous (B, S, H, D) views
    else:
        q, k, v = (torch.randn(b, sr, h, d) for _ in range(3))
    tv = None
    if tv_shape is not None:
        tv = torch.rand(tv_shape) > 0.25
    mask = _mask(bm, hm, sf // bs, bs)
    t = mask.transpose()
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=dev)
    tv_f = _folded_valid(tv, idx, b)
    if cu is not None:
        tv_f = None if tv_f is None else tv_f[0]
    to = lambda x: None if x is None else x.to(dev)  # noqa: E731
    exact = not (dev != "cpu" and scheme == "atomic")

    out, lse = bsa.bsa_forward_triton(to(q), to(k), to(v), to(mask.kv_ptr), to(mask.kv_cols), bs, None,
                                      to(tv), cu_t, token_index=to(idx))
    qf, kf, vf = (_gather(x, idx) for x in (q, k, v))
    out_f, lse_f = bsa.bsa_forward_triton(to(qf), to(kf), to(vf), to(mask.kv_ptr), to(mask.kv_cols), bs, None,
                                          to(tv_f), cu_t)
    assert out.shape == q.shape and lse.shape == (b, h, sf)
    _same(out, _scatter(out_f.cpu(), idx, sr), "out")
    _same(lse, lse_f, "lse")
    assert torch.isneginf(lse[0, 0, (sf // bs - 1) * bs:]).all()  # the empty query block

    do = torch.randn(b, sr, h, d)
    dlse = torch.randn(b, h, sf) if case.startswith("bs16") else None
    grads = bsa.bsa_backward_triton(to(do), to(q), to(k), to(v), out, lse, to(mask.kv_ptr), to(mask.kv_cols),
                                    to(t.kv_ptr), to(t.kv_cols), bs, None, to(tv), cu_t, scheme=scheme,
                                    dlse=to(dlse), token_index=to(idx))
    grads_f = bsa.bsa_backward_triton(to(_gather(do, idx)), to(qf), to(kf), to(vf), out_f, lse_f,
                                      to(mask.kv_ptr), to(mask.kv_cols), to(t.kv_ptr), to(t.kv_cols), bs,
                                      None, to(tv_f), cu_t, scheme=scheme, dlse=to(dlse))
    for name, g, gf, x in zip(("dq", "dk", "dv"), grads, grads_f, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        _same(g, _scatter(gf.cpu(), idx, sr), name, exact or name != "dq")


def test_index_pad_positions_are_pad_keys(triton_device):
    """A -1 position is never attended, even where token_valid says True: same result as an index
    with the real rows only at the same positions and token_valid False there."""
    bsa = _bsa()
    bs, sr, sf, h, d = 16, 24, 32, 1, 16
    idx = _index(sr, sf)
    q, k, v = (torch.randn(1, sr, h, d, device=triton_device) for _ in range(3))
    mask = BlockSparseMask.from_dense_blocks(torch.ones(2, 2, dtype=torch.bool), bs).to(triton_device)
    all_true = torch.ones(sf, dtype=torch.bool, device=triton_device)
    out, lse = bsa.bsa_forward_triton(q, k, v, mask.kv_ptr, mask.kv_cols, bs, None, all_true, None,
                                      token_index=idx.to(triton_device))
    ref = torch.softmax(torch.einsum("qhd,khd->hqk", q[0], k[0]).double() / math.sqrt(d), -1)
    want = torch.einsum("hqk,khd->qhd", ref, v[0].double())
    torch.testing.assert_close(out[0].double().cpu(), want.cpu(), rtol=1e-5, atol=1e-6)


def test_without_index_unchanged(triton_device):
    """token_index=None is the old path: same results as a call without the argument."""
    bsa = _bsa()
    bs, s, h, d = 16, 64, 2, 16
    q, k, v = (torch.randn(1, s, h, d, device=triton_device) for _ in range(3))
    mask = _mask(1, h, s // bs, bs).to(triton_device)
    a = bsa.bsa_forward_triton(q, k, v, mask.kv_ptr, mask.kv_cols, bs, None, None, None)
    b_ = bsa.bsa_forward_triton(q, k, v, mask.kv_ptr, mask.kv_cols, bs, None, None, None, token_index=None)
    assert torch.equal(a[0], b_[0]) and torch.equal(a[1], b_[1])


@pytest.mark.parametrize("make, match", [
    (lambda sr: _index(sr, 32).int(), "int64"),
    (lambda sr: _index(sr, 32)[None], "1-D"),
    (lambda sr: _index(sr, 30), "multiple of block_size"),
    (lambda sr: torch.cat([_index(sr, 31), torch.tensor([sr])]), r"\[0, 24\) .* or -1"),
    (lambda sr: torch.cat([_index(sr, 31), torch.tensor([-2])]), r"\[0, 24\) .* or -1"),
    (lambda sr: torch.cat([torch.arange(sr), torch.zeros(8, dtype=torch.int64)]), "exactly once"),
    (lambda sr: torch.cat([torch.arange(sr - 1), torch.full((9,), -1)]), "exactly once"),
    (lambda sr: torch.arange(16), "fewer than"),
])
def test_rejects_bad_token_index(triton_device, make, match):
    bsa = _bsa()
    sr, bs = 24, 16
    q = torch.randn(1, sr, 1, 16, device=triton_device)
    mask = BlockSparseMask.from_dense_blocks(torch.ones(2, 2, dtype=torch.bool), bs).to(triton_device)
    idx = make(sr).to(triton_device)
    with pytest.raises(ValueError, match="token_index") as err:
        bsa.bsa_forward_triton(q, q, q, mask.kv_ptr, mask.kv_cols, bs, None, None, None, token_index=idx)
    assert err.match(match)
    t = mask.transpose()
    with pytest.raises(ValueError, match=match):
        bsa.bsa_backward_triton(q, q, q, q, q, torch.zeros(1, 1, 32, device=triton_device), mask.kv_ptr,
                                mask.kv_cols, t.kv_ptr, t.kv_cols, bs, None, None, None, token_index=idx)
    with pytest.raises(ValueError, match=match):
        _nabla()._nabla_block_mask_forward(q, q, 0.9, None, bs, None, None, token_index=idx)


def test_rejects_index_with_cross_attention(triton_device):
    bsa = _bsa()
    q = torch.randn(1, 32, 1, 16, device=triton_device)
    k = torch.randn(1, 48, 1, 16, device=triton_device)
    mask = BlockSparseMask.from_dense_blocks(torch.ones(2, 2, dtype=torch.bool), 16).to(triton_device)
    with pytest.raises(ValueError, match="token_index needs self-attention"):
        bsa.bsa_forward_triton(q, k, k, mask.kv_ptr, mask.kv_cols, 16, None, None, None,
                               token_index=torch.arange(32, device=triton_device))


# ------------------------------------------------------------------------------------------------ NABLA
def _cpp_mask(q, k, thr, sta, bs, tv, cu):
    op = _ext.cpp_op("nabla_block_mask")
    if op is None:
        return None
    return op(q.cpu(), k.cpu(), thr, None if sta is None else sta.cpu(), bs, None if tv is None else tv.cpu(),
              None if cu is None else cu.cpu())


def _reference_mask(q, k, thr, sta, bs, tv, cu):
    dense = _nabla()._nabla_reference(q.cpu(), k.cpu(), thr, None if sta is None else sta.cpu(), bs,
                                      None if tv is None else tv.cpu(), None if cu is None else cu.cpu())
    m = BlockSparseMask.from_dense_blocks(dense, bs)
    return m.kv_ptr, m.kv_cols


def _check_against_dense_compression(ptr, cols, q, k, thr, sta, bs, tv, cu):
    n = q.shape[1] // bs
    assert cols.dtype == (torch.int16 if n <= 32768 else torch.int32)
    cpp = _cpp_mask(q, k, thr, sta, bs, tv, cu)
    if cpp is not None:
        assert_exact(ptr.cpu(), cpp[0], "kv_ptr vs C++")
        assert_exact(cols.cpu(), cpp[1].to(cols.dtype), "kv_cols vs C++")
    ref_ptr, ref_cols = _reference_mask(q, k, thr, sta, bs, tv, cu)
    assert_exact(ptr.cpu(), ref_ptr, "kv_ptr vs reference")
    assert_exact(cols.cpu(), ref_cols.to(cols.dtype), "kv_cols vs reference")
    # ascending ids within each row
    p = ptr.cpu().flatten().tolist()
    c = cols.cpu().long()
    for r in range(ptr.shape[0] * ptr.shape[1]):
        for i in range(n):
            lo, hi = ptr.cpu()[r // ptr.shape[1], r % ptr.shape[1], i:i + 2].tolist()
            row = c[lo:hi]
            assert (row[1:] > row[:-1]).all()
    assert p[-1] == cols.numel()


@pytest.mark.parametrize("thr", [0.5, 0.9, 1.0])
@pytest.mark.parametrize("extras", ["plain", "sta", "valid", "sta-valid-cu"])
def test_nabla_csr_direct_equals_dense_compression(triton_device, thr, extras):
    """The compressed rows written by the kernel equal the dense table compressed (C++ op, reference)."""
    nb = _nabla()
    bs, n, h, d = 16, 9, 2, 16
    b = 1 if "cu" in extras else 2
    q = (torch.randn(b, n * bs, h, d) * 3).to(triton_device)
    k = (torch.randn(b, n * bs, h, d) * 3).to(triton_device)
    sta = sta_block_mask(n, 1, 1, (3, 1, 1)).to(triton_device) if "sta" in extras else None
    tv = None
    if "valid" in extras:
        tv = torch.rand(b, n * bs) > 0.3
        tv[:, 2 * bs:3 * bs] = False  # a block without real tokens
        tv = tv.to(triton_device)
    cu = None
    if "cu" in extras:
        cu = torch.tensor([0, 3 * bs, 7 * bs], dtype=torch.int32, device=triton_device)
    if cu is not None:
        nb._check_cu_blocks(cu, n * bs, bs)
    ptr, cols = nb._nabla_block_mask_forward(q, k, thr, sta, bs, tv, cu)
    assert ptr.shape == (b, h, n + 1) and ptr.dtype == torch.int64
    _check_against_dense_compression(ptr, cols, q, k, thr, sta, bs, tv, cu)


def test_nabla_csr_direct_larger_rows(triton_device):
    """More blocks than one row tile (BLOCK_M = 16 rows a program), B = 2, H = 2: the row offsets of
    every (b, h) head stay consecutive."""
    nb = _nabla()
    bs, n, h, d = 16, 37, 2, 16
    q = torch.randn(2, n * bs, h, d, device=triton_device) * 2
    k = torch.randn(2, n * bs, h, d, device=triton_device) * 2
    ptr, cols = nb._nabla_block_mask_forward(q, k, 0.8, None, bs, None, None)
    _check_against_dense_compression(ptr, cols, q, k, 0.8, None, bs, None, None)


def test_nabla_csr_direct_int32_ids(triton_device, monkeypatch):
    """Masks of more than 32768 blocks store int32 ids (too large for the interpreter): forced here."""
    nb = _nabla()
    monkeypatch.setattr(nb, "_ids_dtype", lambda n: torch.int32)
    bs, n, h, d = 16, 6, 2, 16
    q = torch.randn(2, n * bs, h, d, device=triton_device) * 3
    k = torch.randn(2, n * bs, h, d, device=triton_device) * 3
    sta = sta_block_mask(n, 1, 1, (3, 1, 1)).to(triton_device)
    ptr, cols = nb._nabla_block_mask_forward(q, k, 0.7, sta, bs, None, None)
    assert cols.dtype == torch.int32
    ref_ptr, ref_cols = _reference_mask(q, k, 0.7, sta, bs, None, None)
    assert_exact(ptr.cpu(), ref_ptr, "kv_ptr")
    assert_exact(cols.cpu(), ref_cols.to(torch.int32), "kv_cols")


def test_nabla_nonfinite_still_raises(triton_device):
    nb = _nabla()
    q = torch.randn(1, 64, 1, 16, device=triton_device)
    q[0, 20, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="query block 1 of"):
        nb._nabla_block_mask_forward(q, q.nan_to_num(), 0.9, None, 16, None, None)


@pytest.mark.parametrize("thr", [0.5, 0.9, 1.0])
@pytest.mark.parametrize("extras", ["pads", "nopads", "pads-valid-sta", "pads-cu"])
def test_nabla_with_index_equals_gathered(triton_device, thr, extras):
    nb = _nabla()
    bs, h, d = 16, 2, 16
    sf = 8 * bs
    sr = sf if extras == "nopads" else sf - 21
    b = 1 if "cu" in extras else 2
    idx = _index(sr, sf)
    q, k = (torch.randn(b, sr, h, d) * 3 for _ in range(2))
    tv = (torch.rand(sf) > 0.3) if "valid" in extras else None
    sta = sta_block_mask(sf // bs, 1, 1, (3, 1, 1)) if "sta" in extras else None
    cu = torch.tensor([0, 3 * bs, 6 * bs], dtype=torch.int32) if "cu" in extras else None
    to = lambda x: None if x is None else x.to(triton_device)  # noqa: E731
    ptr, cols = nb._nabla_block_mask_forward(to(q), to(k), thr, to(sta), bs, to(tv), to(cu),
                                             token_index=to(idx))
    tv_f = _folded_valid(tv, idx, b)
    qf, kf = _gather(q, idx), _gather(k, idx)
    ptr_f, cols_f = nb._nabla_block_mask_forward(to(qf), to(kf), thr, to(sta), bs, to(tv_f), to(cu))
    assert_exact(ptr.cpu(), ptr_f.cpu(), "kv_ptr")
    assert_exact(cols.cpu(), cols_f.cpu(), "kv_cols")
    _check_against_dense_compression(ptr, cols, qf, kf, thr, sta, bs, tv_f, cu)
