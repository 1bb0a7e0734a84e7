"""token_index on the C++ CPU ops (bsa_fwd, bsa_bwd, nabla_block_mask): raster-order tensors read and
written through an index (docs: /work/notes/token_index_spec.md, "the fused gather/scatter").

The contract tested here, bit for bit (torch.equal): op(raster tensors, token_index) equals the op
without an index on the gathered tensors ``xf[:, valid] = x[:, token_index[valid]]`` (zeros at pad
positions, token_valid AND-ed with ``token_index >= 0``), its outputs scattered back; lse identical.
"""
from __future__ import annotations

import os
from unittest import mock

import pytest
import torch

from kandinsky_kernels import _ext

if _ext.cpp_op("bsa_fwd") is None or _ext.cpp_op("nabla_block_mask") is None:
    pytest.skip("the C++ extension is not built", allow_module_level=True)

OPS = torch.ops.kandinsky_kernels_C
ISAS = _ext.cpu_isas()


# ---------------------------------------------------------------------------------------------- helpers
def fractal_index(t: int, h: int, w: int, tile: int = 8) -> torch.Tensor:
    """Positions of a (t, h, w) raster grid in 8x8-tile order with the grid padded up to whole tiles:
    index[p] = the raster row at position p, -1 for a pad position (h or w not a multiple of 8)."""
    hp, wp = -(-h // tile) * tile, -(-w // tile) * tile
    tt, yy, xx = torch.meshgrid(torch.arange(t), torch.arange(hp), torch.arange(wp), indexing="ij")
    raster = torch.where((yy < h) & (xx < w), (tt * h + yy) * w + xx, torch.full_like(yy, -1))
    # (t, hp/tile, tile, wp/tile, tile) -> (t, hp/tile, wp/tile, tile, tile): one tile after another
    raster = raster.reshape(t, hp // tile, tile, wp // tile, tile).permute(0, 1, 3, 2, 4)
    return raster.reshape(-1).contiguous()


def perm_index(sr: int, seed: int = 0) -> torch.Tensor:
    return torch.randperm(sr, generator=torch.Generator().manual_seed(seed))


def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    valid = idx >= 0
    xf = x.new_zeros(x.shape[0], idx.numel(), *x.shape[2:])
    xf[:, valid] = x[:, idx[valid]]
    return xf


def scatter(xf: torch.Tensor, idx: torch.Tensor, sr: int) -> torch.Tensor:
    valid = idx >= 0
    x = xf.new_full((xf.shape[0], sr, *xf.shape[2:]), float("nan"))  # every row must be written
    x[:, idx[valid]] = xf[:, valid]
    return x


def csr_mask(bm: int, hm: int, nb: int, density: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    dense = (torch.rand(bm, hm, nb, nb, generator=g) < density) | torch.eye(nb, dtype=torch.bool)
    counts = dense.sum(-1)
    ptr = torch.zeros(bm, hm, nb + 1, dtype=torch.int64)
    ptr.view(-1)[1:] = 0
    flat = torch.cat([torch.zeros(1, dtype=torch.int64), counts.reshape(-1).cumsum(0)])
    for r in range(bm * hm):  # rows follow each other: head r's last pointer is head r+1's first
        ptr.view(bm * hm, nb + 1)[r] = flat[r * nb: r * nb + nb + 1]
    cols = torch.nonzero(dense.reshape(-1, nb))[:, 1].to(torch.int16)
    qptr, qcols = OPS.bsa_mask_transpose(ptr, cols, nb)
    return ptr, cols, qptr, qcols


def ref_valid(idx, tv, b):
    """token_valid of the gathered call: tv AND token_index >= 0 (None when neither masks a token)."""
    pads = idx < 0
    if tv is None and not bool(pads.any()):
        return None
    base = tv if tv is not None else torch.ones(1, idx.numel(), dtype=torch.bool)
    return base & ~pads


# Cases: (name, B, H, D, block size, index builder, token_valid?, broadcast mask?, cu_seqlens, dlse?)
CASES = {
    # 2 x 10 x 12 grid: 240 rows in 512 positions (pads), per-batch masks
    "fractal-pads-bs64": dict(B=2, H=2, D=32, bs=64, idx=lambda: fractal_index(2, 10, 12), tv=False,
                              bcast=False, cu=None, dlse=True),
    # a permutation without pads, bs 16, one mask for every batch and head
    "perm-bs16-broadcast": dict(B=2, H=2, D=16, bs=16, idx=lambda: perm_index(256), tv=False, bcast=True,
                                cu=None, dlse=False),
    # 12 x 10 grid padded to 16 x 16 with token_valid on top, bs 16
    "fractal-pads-tv-bs16": dict(B=2, H=2, D=64, bs=16, idx=lambda: fractal_index(1, 12, 10), tv=True,
                                 bcast=False, cu=None, dlse=True),
    # a shuffled fractal index (pads anywhere), token_valid (1, Sf), head-broadcast mask
    "shuffled-pads-tv1-bs64": dict(B=2, H=2, D=32, bs=64,
                                   idx=lambda: fractal_index(1, 20, 14)[perm_index(384, 3)], tv=True,
                                   bcast=True, cu=None, dlse=False),
    # packed videos (positions) with pads, B = 1
    "fractal-pads-cu": dict(B=1, H=2, D=32, bs=64, idx=lambda: fractal_index(2, 10, 12), tv=False,
                            bcast=False, cu=[0, 200, 512], dlse=True),
}


def make_case(name: str, dtype: torch.dtype, seed: int = 0):
    c = CASES[name]
    torch.manual_seed(seed)
    idx = c["idx"]()
    sr, sf = int((idx >= 0).sum()), idx.numel()
    B, H, D, bs = c["B"], c["H"], c["D"], c["bs"]
    q, k, v = (torch.randn(B, sr, H, D).to(dtype) for _ in range(3))
    tv = None
    if c["tv"]:
        tv = torch.rand(1 if name.startswith("shuffled") else B, sf) > 0.15
    nb = sf // bs
    mask = csr_mask(1 if c["bcast"] else B, 1 if c["bcast"] else H, nb, 0.3, seed)
    cu = torch.tensor(c["cu"], dtype=torch.int32) if c["cu"] is not None else None
    dlse = torch.randn(B, H, sf) if c["dlse"] else None
    return idx, sr, q, k, v, tv, mask, cu, dlse, bs


def _env(isa: str, scheme: str | None = None):
    env = {}
    if isa == "bf16-conversion":
        env["KANDINSKY_BSA_CPU_BF16_DOT"] = "0"
    elif isa != "auto":
        env["KANDINSKY_CPU_ISA"] = isa
    if scheme is not None:
        env["KANDINSKY_BSA_CPU_BWD"] = scheme
    return mock.patch.dict(os.environ, env)


PATHS = ["auto", "avx512", "avx2", "baseline", "bf16-conversion"]


def _skip_path(isa, dtype):
    if isa in ("avx512", "avx2", "baseline") and isa not in ISAS:
        pytest.skip(f"{isa} cannot run here")
    if isa == "bf16-conversion" and dtype != torch.bfloat16:
        pytest.skip("the bf16 conversion switch only changes bf16")
    if isa == "baseline" and dtype != torch.float32:
        pytest.skip("the baseline path: fp32 is enough (every dtype runs the same fp32 kernels there)")
    if isa == "avx512" and dtype != torch.bfloat16 and OPS.cpu_isa() in ("amx", "avx512_bf16"):
        pytest.skip("fp32 / fp16 run the avx512 kernels on the automatic path here")


# --------------------------------------------------------------------------- attention: the contract
@pytest.mark.parametrize("scheme", ["fused", "two_pass"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_attention_index_equals_gathered(dtype, isa, case, scheme):
    _skip_path(isa, dtype)
    idx, sr, q, k, v, tv, (ptr, cols, qptr, qcols), cu, dlse, bs = make_case(case, dtype)
    scale = q.shape[-1] ** -0.5
    tv_ref = ref_valid(idx, tv, q.shape[0])
    qf, kf, vf = (gather(x, idx) for x in (q, k, v))
    with _env(isa, scheme):
        out, lse = OPS.bsa_fwd(q, k, v, ptr, cols, bs, scale, tv, cu, idx)
        outf, lsef = OPS.bsa_fwd(qf, kf, vf, ptr, cols, bs, scale, tv_ref, cu)
        assert out.shape == q.shape and lse.shape == (q.shape[0], q.shape[2], idx.numel())
        assert torch.equal(out, scatter(outf, idx, sr))
        assert torch.equal(lse, lsef)

        dout = torch.randn_like(q)
        grads = OPS.bsa_bwd(dout, q, k, v, out, lse, ptr, cols, qptr, qcols, bs, scale, tv, cu, dlse, idx)
        grads_f = OPS.bsa_bwd(gather(dout, idx), qf, kf, vf, gather(out, idx), lsef, ptr, cols, qptr, qcols, bs,
                              scale, tv_ref, cu, dlse)
    for name, g, gf, x in zip(("dq", "dk", "dv"), grads, grads_f, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype
        assert torch.equal(g, scatter(gf, idx, sr)), name


def test_attention_strided_raster_inputs():
    """Raster q, k, v as views of one (B, Sr, 3, H, D) tensor (any strides, unit stride on D)."""
    idx = fractal_index(1, 12, 12)
    sr, bs = 144, 64
    qkv = torch.randn(2, sr, 3, 2, 32)
    q, k, v = qkv.unbind(2)
    ptr, cols, qptr, qcols = csr_mask(2, 2, idx.numel() // bs, 0.5, 1)
    for dtype in (torch.float32, torch.bfloat16):
        q_, k_, v_ = (x.to(dtype) if dtype != torch.float32 else x for x in (q, k, v))
        if dtype != torch.float32:
            q_, k_, v_ = qkv.to(dtype).unbind(2)
        out, lse = OPS.bsa_fwd(q_, k_, v_, ptr, cols, bs, 0.2, None, None, idx)
        outf, lsef = OPS.bsa_fwd(*(gather(x, idx) for x in (q_, k_, v_)), ptr, cols, bs, 0.2,
                                 ref_valid(idx, None, 2), None)
        assert torch.equal(out, scatter(outf, idx, sr)) and torch.equal(lse, lsef)


def test_attention_no_index_argument_unchanged():
    """The old calls (no token_index) still run and an explicit None is the same call."""
    q, k, v = (torch.randn(1, 128, 2, 32) for _ in range(3))
    ptr, cols, qptr, qcols = csr_mask(1, 1, 2, 1.0, 0)
    a = OPS.bsa_fwd(q, k, v, ptr, cols, 64, 0.3, None, None)
    b = OPS.bsa_fwd(q, k, v, ptr, cols, 64, 0.3, None, None, None)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    dout = torch.randn_like(q)
    ga = OPS.bsa_bwd(dout, q, k, v, a[0], a[1], ptr, cols, qptr, qcols, 64, 0.3, None, None)
    gb = OPS.bsa_bwd(dout, q, k, v, a[0], a[1], ptr, cols, qptr, qcols, 64, 0.3, None, None, None, None)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


# -------------------------------------------------------------------------------- NABLA: the contract
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "idx_name,bs,tv,sta,cu",
    [
        ("fractal-pads", 64, False, False, None),
        ("fractal-pads", 16, True, True, None),
        ("perm", 16, False, True, None),
        ("perm", 64, True, False, None),
        ("fractal-pads", 64, False, False, [0, 256, 512]),
    ],
)
def test_nabla_index_equals_gathered(dtype, idx_name, bs, tv, sta, cu):
    torch.manual_seed(0)
    idx = fractal_index(2, 10, 12) if idx_name == "fractal-pads" else perm_index(512, 5)
    sr, sf = int((idx >= 0).sum()), idx.numel()
    B = 1 if cu is not None else 2
    q, k = (torch.randn(B, sr, 2, 32).to(dtype) for _ in range(2))
    n = sf // bs
    tvt = torch.rand(B, sf) > 0.2 if tv else None
    stat = (torch.rand(n, n) < 0.1) if sta else None
    cut = torch.tensor(cu, dtype=torch.int32) if cu is not None else None
    ref_tv = ref_valid(idx, tvt, B)
    if ref_tv is not None:
        ref_tv = ref_tv.expand(B, sf).contiguous()
    for thr in (0.5, 0.9):
        ptr, cols = OPS.nabla_block_mask(q, k, thr, stat, bs, tvt, cut, idx)
        ptr_f, cols_f = OPS.nabla_block_mask(gather(q, idx), gather(k, idx), thr, stat, bs, ref_tv, cut)
        assert ptr.shape == (B, 2, n + 1)
        assert torch.equal(ptr, ptr_f) and torch.equal(cols, cols_f)


# ------------------------------------------------------------------------------------ bad indexes raise
def _bad_indexes(idx: torch.Tensor, sr: int, bs: int):
    valid_pos = torch.nonzero(idx >= 0)[:, 0]
    dup = idx.clone()
    dup[valid_pos[1]] = idx[valid_pos[0]]
    missing = idx.clone()
    missing[valid_pos[2]] = -1
    out_of_range = idx.clone()
    out_of_range[valid_pos[3]] = sr
    below = idx.clone()
    below[valid_pos[3]] = -2
    return {
        "dtype": (idx.to(torch.int32), "int64"),
        "length": (torch.cat([idx, torch.full((bs // 2,), -1)]), "multiple of block_size"),
        "short": (idx[: idx.numel() - bs], "misses row|multiple of block_size|every one"),
        "out-of-range": (out_of_range, "out of range"),
        "negative": (below, "out of range"),
        "duplicate": (dup, "twice"),
        "missing": (missing, "misses row"),
        "2-d": (idx.reshape(2, -1), "int64 \\(Sf,\\)"),
        "non-contiguous": (torch.stack([idx, idx], 1)[:, 0], "contiguous"),
        # an index on another device than q: the dispatcher routes the call away from the CPU kernel
        # (here to Meta, which has no kernel) before the C++ device check can see it; either way it raises
        "device": (idx.to("meta"), "token_index|device|Meta"),
    }


@pytest.mark.parametrize("bad", ["dtype", "length", "short", "out-of-range", "negative", "duplicate", "missing",
                                 "2-d", "non-contiguous", "device"])
def test_bad_index_raises(bad):
    idx = fractal_index(1, 12, 12)
    sr, bs = 144, 64
    q, k, v = (torch.randn(1, sr, 2, 16) for _ in range(3))
    ptr, cols, qptr, qcols = csr_mask(1, 1, idx.numel() // bs, 1.0, 0)
    bad_idx, match = _bad_indexes(idx, sr, bs)[bad]
    exc = (ValueError, RuntimeError, NotImplementedError)
    calls = {
        "bsa_fwd": lambda: OPS.bsa_fwd(q, k, v, ptr, cols, bs, 0.3, None, None, bad_idx),
        "bsa_bwd": lambda: OPS.bsa_bwd(q, q, k, v, q, torch.zeros(1, 2, idx.numel()), ptr, cols, qptr, qcols, bs,
                                       0.3, None, None, None, bad_idx),
        "nabla_block_mask": lambda: OPS.nabla_block_mask(q, k, 0.5, None, bs, None, None, bad_idx),
    }
    for name, call in calls.items():
        with pytest.raises(exc) as info:
            call()
        msg = str(info.value)
        if bad != "device":
            assert "token_index" in msg, (name, msg)
        assert __import__("re").search(match, msg), (name, msg)


def test_index_needs_self_attention_rows():
    idx = perm_index(128)
    q = torch.randn(1, 128, 2, 16)
    k = torch.randn(1, 64, 2, 16)
    ptr, cols, _, _ = csr_mask(1, 1, 2, 1.0, 0)
    with pytest.raises(ValueError, match="token_index"):
        OPS.bsa_fwd(q, k, k, ptr, cols, 64, 0.3, None, None, idx)


def test_fractal_index_helper_is_the_fractal_order():
    """The helper's index is fractal_flatten's order (pads at its zero-padded positions)."""
    from kandinsky_kernels.ops.fractal import fractal_flatten

    t, h, w = 2, 10, 12
    rows = (torch.arange(t * h * w, dtype=torch.float64) + 1).reshape(1, t, h, w, 1)
    expect = fractal_flatten(rows, grid=(t, h, w)).reshape(-1).long() - 1
    assert torch.equal(fractal_index(t, h, w), expect)
