"""Hostile and edge inputs for every public op, run case by case in a worker process.

Each case states what must happen: a ``ValueError`` whose message matches a pattern (:func:`rejects`),
or a result equal to the fp64 dense oracle, NaN where the oracle says so (:func:`agrees`). A case
that crashes the process (a segfault, an abort, a heap corruption) is a failed case, never a dead
test run: ``tests/test_fuzz.py`` runs the cases here in a subprocess, restarts it after a crash and
reports every case as its own test.

Run by hand: ``python tests/fuzz_cases.py [NAME ...]`` prints one ``RESULT <name> PASS|FAIL ...`` line
per case (every case when no name is given).
"""
from __future__ import annotations

import os
import re
import sys
import traceback
from typing import Callable

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors, before triton loads

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kandinsky_kernels as kk  # noqa: E402
from kandinsky_kernels import _triton  # noqa: E402
from kandinsky_kernels.backends import use_backend  # noqa: E402
from kandinsky_kernels.mask import BlockSparseMask  # noqa: E402
from kandinsky_kernels.reference.attention import block_sparse_attention_reference  # noqa: E402

CASES: dict[str, Callable[[], None]] = {}

ATTN_BACKENDS = ["cpu", "triton", "reference"]
S, H, D, BS = 256, 2, 32, 64  # 4 blocks of 64 tokens
NB = S // BS


def case(name: str):
    def register(fn):
        assert name not in CASES, name
        CASES[name] = fn
        return fn

    return register


class Skip(Exception):
    """The case cannot run in this environment (the reason is reported)."""


def backend_scope(backend: str):
    if backend == "triton" and not _triton.triton_runs_on("cpu"):
        raise Skip(_triton.why_not("cpu"))
    return use_backend(backend)


def rejects(fn: Callable[[], object], pattern: str) -> None:
    """``fn()`` must raise ValueError with a message matching ``pattern`` (re.search, case-insensitive)."""
    try:
        fn()
    except ValueError as e:
        if not re.search(pattern, str(e), re.IGNORECASE):
            raise AssertionError(f"ValueError raised, but its message {str(e)!r} does not match {pattern!r}")
        return
    except Skip:  # the case cannot run here (raised by backend_scope inside fn): a skip, not a failure
        raise
    except Exception as e:  # noqa: BLE001 - any other error is an unclear one
        raise AssertionError(f"expected ValueError matching {pattern!r}, got {type(e).__name__}: {e}") from e
    raise AssertionError(f"expected ValueError matching {pattern!r}, but the call returned")


def agrees(got: torch.Tensor, want: torch.Tensor, name: str = "output", *, nan_superset: bool = False,
           torch_out: torch.Tensor | None = None) -> None:
    """Same shape, NaN and +-inf exactly where ``want`` has them, and elsewhere within the fp32
    tolerance policy. ``nan_superset``: ``got`` may also be NaN where ``want`` is finite (the dense
    reference backend, whose zero products reach hidden values), but nowhere else off. ``torch_out``:
    plain torch at got's dtype, the policy's yardstick (default: the oracle rounded to that dtype)."""
    from conftest import assert_close_to_reference

    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    nan_got, nan_want = got.isnan(), want.isnan()
    same = (nan_got | ~nan_want).all() if nan_superset else torch.equal(nan_got, nan_want)
    if not same:
        raise AssertionError(f"{name}: {int(nan_got.sum())} NaN where the oracle has {int(nan_want.sum())}")
    inf_want = want.isinf()
    check = ~(nan_got | nan_want | inf_want)
    if not torch.equal(got[inf_want & ~nan_got], want[inf_want & ~nan_got].to(got.dtype)):
        raise AssertionError(f"{name}: +-inf entries differ from the oracle's")
    yardstick = None if torch_out is None else torch_out[check]
    assert_close_to_reference(got[check], want[check].to(torch.float64), yardstick, name=name)


def qkv(seed: int = 0, s: int = S, d: int = D, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, s, H, d, generator=g).to(dtype) for _ in range(3)]


def full_mask(nb: int = NB) -> BlockSparseMask:
    return BlockSparseMask.from_dense_blocks(torch.ones(nb, nb, dtype=torch.bool))


def band_mask() -> BlockSparseMask:
    """Block i sees blocks i-1, i, i+1: rows differ in what they see, so NaN must stay local."""
    i = torch.arange(NB)
    return BlockSparseMask.from_dense_blocks((i[:, None] - i[None, :]).abs() <= 1)


def oracle(q, k, v, mask, cu_seqlens=None):
    return block_sparse_attention_reference(q.double(), k.double(), v.double(), mask, cu_seqlens=cu_seqlens)


def blockwise_oracle(q, k, v, mask):
    """fp64 attention that, like the kernels, reads only the key blocks each query block sees: the
    oracle of non-finite inputs (the dense reference multiplies hidden values by zero, so a NaN there
    reaches every row). Full blocks only: no padding, no cu_seqlens."""
    b, s, h, d = q.shape
    bs, out = mask.block_size, torch.zeros(b, s, h, d, dtype=torch.float64)
    dense = mask.to_dense_blocks().expand(b, h, -1, -1)
    for bi in range(b):
        for hi in range(h):
            for i in range(s // bs):
                keys = torch.cat([torch.arange(j * bs, (j + 1) * bs) for j in dense[bi, hi, i].nonzero()[:, 0]])
                rows = slice(i * bs, (i + 1) * bs)
                logits = q[bi, rows, hi].double() @ k[bi, keys, hi].double().T * d ** -0.5
                out[bi, rows, hi] = torch.softmax(logits, -1) @ v[bi, keys, hi].double()
    return out


def _bsa(backend, *args, compiled=False, **kwargs):
    fn = kk.block_sparse_attention
    if compiled:
        torch._dynamo.reset()  # the backend is fixed per traced graph
        fn = torch.compile(fn, fullgraph=True)
    with backend_scope(backend):
        return fn(*args, **kwargs)


# ------------------------------------------------------------------------------ block_sparse_attention
_BAD_MASKS = {
    # name: (counts, first row of indices), expected message
    "count-negative": ((-1,), (0, 1, 2, 3)),
    "count-above-nk": ((NB + 1,), (0, 1, 2, 3)),
    "index-out-of-range": ((2,), (0, NB, 1, 2)),
    "index-negative": ((2,), (-1, 0, 1, 2)),
    "index-repeated": ((3,), (0, 2, 2, 1)),
    "index-huge": ((1,), (2**31 - 1, 0, 1, 2)),
}
_BAD_MASK_MESSAGES = {
    "count-negative": "kv_num_blocks must lie in",
    "count-above-nk": "kv_num_blocks must lie in",
    "index-out-of-range": "kv_indices must lie in",
    "index-negative": "kv_indices must lie in",
    "index-repeated": "repeats",
    "index-huge": "kv_indices must lie in",
}

for _name, (_counts, _row) in _BAD_MASKS.items():
    _msg = _BAD_MASK_MESSAGES[_name]

    @case(f"mask-constructor-{_name}")
    def _(_counts=_counts, _row=_row, _msg=_msg):
        counts = torch.full((1, 1, NB), NB, dtype=torch.int32)
        counts[..., 0] = _counts[0]
        indices = torch.arange(NB, dtype=torch.int32).repeat(1, 1, NB, 1)
        indices[0, 0, 0] = torch.tensor(_row, dtype=torch.int32)
        rejects(lambda: BlockSparseMask(counts, indices), _msg)


# The compressed rows a mask holds, corrupted in place after construction (as a user can): the
# attention ops must notice (the mask was checked when built; the in-place change bumps the version).
_BAD_CSR = {
    # name: (function corrupting (ptr, cols) of a full NB x NB mask in place), expected message
    "ptr-decreasing": (lambda p, c: p[0, 0, 1].fill_(-1), "row pointers"),
    "ptr-row-too-long": (lambda p, c: p[0, 0, 1].fill_(NB + 1), "row pointers"),
    "ptr-past-the-ids": (lambda p, c: p[0, 0, -1].fill_(NB * NB + 3), "row pointers"),
    "id-out-of-range": (lambda p, c: c[1].fill_(NB), "block ids must lie in"),
    "id-negative": (lambda p, c: c[0].fill_(-1), "block ids must lie in"),
    "id-huge": (lambda p, c: c[0].fill_(torch.iinfo(c.dtype).max), "block ids must lie in"),
    "id-repeated": (lambda p, c: c[1].copy_(c[0]), "appears twice"),
}

for _name, (_corrupt, _msg) in _BAD_CSR.items():
    for _backend in ATTN_BACKENDS:
        for _compiled in (False, True) if _name in ("id-out-of-range", "id-repeated") else (False,):

            @case(f"bsa-{_backend}{'-compiled' if _compiled else ''}-mutated-mask-{_name}")
            def _(_corrupt=_corrupt, _msg=_msg, _backend=_backend, _compiled=_compiled):
                q, k, v = qkv()
                m = full_mask()
                _corrupt(m.kv_ptr, m.kv_cols)
                rejects(lambda: _bsa(_backend, q, k, v, m, compiled=_compiled), _msg)

    @case(f"mask-validate-{_name}")
    def _(_corrupt=_corrupt, _msg=_msg):
        m = full_mask()
        _corrupt(m.kv_ptr, m.kv_cols)
        rejects(m.validate, _msg)
        rejects(lambda: BlockSparseMask.from_csr(m.kv_ptr, m.kv_cols, NB), _msg)


for _backend in ATTN_BACKENDS:

    @case(f"bsa-{_backend}-garbage-in-inactive-tail-is-ignored")
    def _(_backend=_backend):
        q, k, v = qkv(1)
        clean = band_mask()
        counts, indices = clean.kv_num_blocks, clean.kv_indices
        active = torch.arange(NB) < counts[..., None]
        dirty = BlockSparseMask(counts, indices.masked_fill(~active, -7))  # the tail is never read
        agrees(_bsa(_backend, q, k, v, dirty), oracle(q, k, v, clean))

    @case(f"bsa-{_backend}-odd-strides")
    def _(_backend=_backend):
        base = torch.randn(1, H, S, 2 * D)
        q = base[..., :D].transpose(1, 2)  # (B, S, H, D) view with strides of another layout
        k = base[..., D:].transpose(1, 2)
        v = torch.randn(1, S, H, D * 2)[..., ::2]  # non-unit stride on D
        m = band_mask()
        agrees(_bsa(_backend, q, k, v, m), oracle(q, k, v, m))

    @case(f"bsa-{_backend}-zero-blocks-row-gives-zeros")
    def _(_backend=_backend):
        q, k, v = qkv(2)
        dense = torch.ones(NB, NB, dtype=torch.bool)
        dense[1] = False
        m = BlockSparseMask.from_dense_blocks(dense)
        out = _bsa(_backend, q, k, v, m)
        assert torch.equal(out[:, BS:2 * BS], torch.zeros_like(out[:, BS:2 * BS])), "a row without keys must be 0"
        agrees(out, oracle(q, k, v, m))

    @case(f"bsa-{_backend}-cu-seqlens-short-of-s")
    def _(_backend=_backend):
        q, k, v = qkv(3)
        m = full_mask()
        cu = torch.tensor([0, 70, 130, 200], dtype=torch.int32)
        agrees(_bsa(_backend, q, k, v, m, cu_seqlens=cu), oracle(q, k, v, m, cu))

    for _label, _cu, _msg in (
        ("not-from-zero", [5, 100, 256], "start at 0"),
        ("decreasing", [0, 200, 100, 256], "non-decreasing"),
        ("past-s", [0, 100, 300], "end"),
        ("huge", [0, 2**31 - 1], "end"),
        ("negative", [0, -5, 256], "non-decreasing"),
    ):
        for _compiled in (False, True) if _label == "decreasing" else (False,):

            @case(f"bsa-{_backend}{'-compiled' if _compiled else ''}-cu-seqlens-{_label}")
            def _(_backend=_backend, _cu=_cu, _msg=_msg, _compiled=_compiled):
                q, k, v = qkv()
                cu = torch.tensor(_cu, dtype=torch.int32)
                rejects(lambda: _bsa(_backend, q, k, v, full_mask(), cu_seqlens=cu, compiled=_compiled), _msg)

    for _label, _cu, _msg in (
        ("int64", torch.tensor([0, 256]), "cu_seqlens must have dtype"),
        ("2d", torch.tensor([[0, 256]], dtype=torch.int32), "cu_seqlens must have 1 dims"),
        ("one-offset", torch.tensor([0], dtype=torch.int32), "at least 2 offsets"),
        ("float", torch.tensor([0.0, 256.0]), "cu_seqlens must have dtype"),
    ):

        @case(f"bsa-{_backend}-cu-seqlens-{_label}")
        def _(_backend=_backend, _cu=_cu, _msg=_msg):
            q, k, v = qkv()
            rejects(lambda: _bsa(_backend, q, k, v, full_mask(), cu_seqlens=_cu), _msg)

    # NaN / inf: rows that see the value are NaN, as in SDPA, forward and backward; others unaffected.
    for _where, _pos, _val in (("q", 70, float("nan")), ("k", 70, float("nan")), ("v", 70, float("nan")),
                               ("k", 130, float("inf")), ("q", 10, float("-inf")), ("v", 200, float("inf"))):
        for _compiled in (False, True) if (_where, _val) == ("k", float("inf")) else (False,):

            @case(f"bsa-{_backend}{'-compiled' if _compiled else ''}-{_where}-{_val}-at-visible-key")
            def _(_backend=_backend, _where=_where, _pos=_pos, _val=_val, _compiled=_compiled):
                q, k, v = qkv(4)
                {"q": q, "k": k, "v": v}[_where][0, _pos, 1, 3] = _val
                m = band_mask()
                want = blockwise_oracle(q, k, v, m)
                assert not want.isfinite().all(), "the case must reach the output"
                agrees(_bsa(_backend, q, k, v, m, compiled=_compiled), want, nan_superset=_backend == "reference")

    @case(f"bsa-{_backend}-nan-backward-agrees-with-forward")
    def _(_backend=_backend):
        q, k, v = (t.requires_grad_() for t in qkv(5))
        with torch.no_grad():
            k[0, 70, 1, 3] = float("nan")
        m = band_mask()
        out = _bsa(_backend, q, k, v, m)
        out.backward(torch.ones_like(out))
        rows = out.isnan().any(-1)[0]  # (S, H): query rows that saw the NaN key
        assert rows[:, 1].sum() == 3 * BS and not rows[:, 0].any(), "NaN rows: blocks 0-2 of head 1 only"
        assert not q.grad[0, :, 0].isnan().any() and not v.grad[0, :, 0].isnan().any(), "head 0 is clean"
        dq_rows = q.grad.isnan().any(-1)[0]
        if _backend == "reference":  # dense: zero products spread the NaN further (see agrees)
            assert (dq_rows | ~rows).all(), "dq must be NaN on every NaN row"
        else:
            assert dq_rows.equal(rows), "dq must be NaN exactly on the NaN rows"


for _backend in ATTN_BACKENDS:
    for _b, _s, _h in ((0, S, H), (1, S, 0), (1, 0, H)):

        @case(f"bsa-{_backend}-empty-b{_b}-s{_s}-h{_h}-forward-backward")
        def _(_backend=_backend, _b=_b, _s=_s, _h=_h):
            q, k, v = (torch.randn(_b, _s, _h, D, requires_grad=True) for _ in range(3))
            nb, mb, mh = _s // BS, max(_b, 1), max(_h, 1)
            m = BlockSparseMask(torch.full((mb, mh, nb), nb, dtype=torch.int32),
                                torch.arange(nb, dtype=torch.int32).repeat(mb, mh, nb, 1))
            out = _bsa(_backend, q, k, v, m)
            out.sum().backward()  # sum's gradient is an expanded (stride 0) tensor
            assert out.shape == q.shape and q.grad.shape == q.shape

    @case(f"bsa-{_backend}-expanded-stride-0-inputs")
    def _(_backend=_backend):
        x = torch.randn(1, 1, H, D).expand(1, S, H, D)
        m = band_mask()
        # Equal keys: the oracle's answer is exactly representable, so plain fp32 torch is the yardstick.
        plain = block_sparse_attention_reference(x, x, x, m, upcast=False)
        agrees(_bsa(_backend, x, x, x, m), oracle(x, x, x, m), torch_out=plain)

    @case(f"bsa-{_backend}-all-keys-padding-gives-zeros")
    def _(_backend=_backend):
        q, k, v = qkv(7)
        m = BlockSparseMask.from_dense_blocks(torch.ones(NB, NB, dtype=torch.bool),
                                              token_valid=torch.zeros(S, dtype=torch.bool))
        out = _bsa(_backend, q, k, v, m)
        assert torch.equal(out, torch.zeros_like(out))


for _label, _mk, _msg in (
    ("q-3d", lambda: [torch.randn(1, S, H)] * 3, "q must have 4 dims"),
    ("shape-mismatch", lambda: [torch.randn(1, S, H, D), torch.randn(1, S, H, D + 16), torch.randn(1, S, H, D)],
     "share one"),
    ("head-dim-0", lambda: [torch.randn(1, S, H, 0)] * 3, "head dim"),
    ("head-dim-8", lambda: [torch.randn(1, S, H, 8)] * 3, "head dim"),
    ("head-dim-512", lambda: [torch.randn(1, S, H, 512)] * 3, "head dim"),
    ("int-dtype", lambda: [torch.ones(1, S, H, D, dtype=torch.int32)] * 3, "dtype"),
    ("float64", lambda: [torch.randn(1, S, H, D, dtype=torch.float64)] * 3, "dtype"),
    ("mixed-dtype", lambda: [torch.randn(1, S, H, D), torch.randn(1, S, H, D).half(), torch.randn(1, S, H, D)],
     "dtype"),
    ("s-not-multiple", lambda: [torch.randn(1, S - 8, H, D)] * 3, "not a multiple"),
    ("not-a-tensor", lambda: [[[1.0]]] * 3, "torch.Tensor"),
):
    for _backend in ATTN_BACKENDS:

        @case(f"bsa-{_backend}-rejects-{_label}")
        def _(_backend=_backend, _mk=_mk, _msg=_msg):
            rejects(lambda: _bsa(_backend, *_mk(), full_mask()), _msg)


for _backend in ATTN_BACKENDS:

    @case(f"bsa-{_backend}-rejects-mask-of-other-size")
    def _(_backend=_backend):
        rejects(lambda: _bsa(_backend, *qkv(), full_mask(NB + 1)), "does not fit")

    @case(f"bsa-{_backend}-rejects-mask-on-other-device")
    def _(_backend=_backend):
        m = full_mask()
        m = BlockSparseMask.from_csr(m.kv_ptr.to("meta"), m.kv_cols.to("meta"), NB)
        rejects(lambda: _bsa(_backend, *qkv(), m), "mask on meta")

    @case(f"bsa-{_backend}-rejects-dense-tensor-as-mask")
    def _(_backend=_backend):
        rejects(lambda: _bsa(_backend, *qkv(), torch.ones(NB, NB, dtype=torch.bool)), "BlockSparseMask")

    for _scale in (float("nan"), float("inf"), True, "0.1"):

        @case(f"bsa-{_backend}-rejects-scale-{_scale}")
        def _(_backend=_backend, _scale=_scale):
            rejects(lambda: _bsa(_backend, *qkv(), full_mask(), scale=_scale), "scale")


# ------------------------------------------------------------------------------------- masks
@case("mask-repr-of-empty-mask")
def _():
    m = BlockSparseMask(torch.zeros(0, 1, 2, dtype=torch.int32), torch.zeros(0, 1, 2, 2, dtype=torch.int32))
    assert "density=0.000" in repr(m), repr(m)


@case("mask-repr-density-in-range")
def _():
    r = repr(band_mask())
    assert "density=0.625" in r, r


@case("mask-from-dense-blocks-rejects-int")
def _():
    rejects(lambda: BlockSparseMask.from_dense_blocks(torch.ones(2, 2, dtype=torch.int32)), "dtype")


@case("mask-to-dense-ignores-inactive-tail")
def _():
    m = band_mask()
    want = m.to_dense_blocks()
    active = torch.arange(NB) < m.kv_num_blocks[..., None]
    dirty = BlockSparseMask(m.kv_num_blocks, m.kv_indices.masked_fill(~active, 99))
    assert torch.equal(dirty.to_dense_blocks(), want)


# ---------------------------------------------------------------------------------- fractal
FRACTAL_BACKENDS = ["cpu", "triton", "reference"]

for _backend in FRACTAL_BACKENDS:
    for _tile in (2**31, 2**40, 2**62):

        @case(f"fractal-{_backend}-flatten-huge-tile-{_tile}")
        def _(_backend=_backend, _tile=_tile):
            x = torch.randn(1, 2, 3, 3, 4)
            with backend_scope(_backend):
                rejects(lambda: kk.fractal_flatten(x, tile=_tile), "too many|overflow")

    @case(f"fractal-{_backend}-unflatten-huge-grid")
    def _(_backend=_backend):
        y = torch.randn(1, 64, 4)
        with backend_scope(_backend):
            rejects(lambda: kk.fractal_unflatten(y, (2**40, 2**20, 2**20)), "S=|too many")

    for _label, _args, _msg in (
        ("grid-2-tuple", (torch.randn(1, 128, 4), (2, 8)), "grid must be"),
        ("grid-zero", (torch.randn(1, 128, 4), (2, 0, 8)), "grid must be"),
        ("grid-wrong-size", (torch.randn(1, 128, 4), (3, 8, 8)), "needs S"),
        ("y-1d", (torch.randn(128), (2, 8, 8)), "at least 2 dims"),
    ):

        @case(f"fractal-{_backend}-unflatten-{_label}")
        def _(_backend=_backend, _args=_args, _msg=_msg):
            with backend_scope(_backend):
                rejects(lambda: kk.fractal_unflatten(*_args), _msg)

    for _label, _x, _tile, _msg in (
        ("4d", torch.randn(1, 2, 8, 8), 8, "at least 5 dims"),
        ("empty-grid", torch.randn(1, 0, 8, 8, 4), 8, "non-empty"),
        ("tile-0", torch.randn(1, 2, 8, 8, 4), 0, "tile"),
        ("tile-negative", torch.randn(1, 2, 8, 8, 4), -8, "tile"),
        ("tile-float", torch.randn(1, 2, 8, 8, 4), 8.0, "tile"),
    ):

        @case(f"fractal-{_backend}-flatten-{_label}")
        def _(_backend=_backend, _x=_x, _tile=_tile, _msg=_msg):
            with backend_scope(_backend):
                rejects(lambda: kk.fractal_flatten(_x, tile=_tile), _msg)


# ------------------------------------------------------------------------------------- NABLA
NABLA_BACKENDS = ["cpu", "triton", "reference"]


def _nabla(backend, *args, compiled=False, **kwargs):
    fn = kk.nabla_block_mask
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn)
    with backend_scope(backend):
        return fn(*args, **kwargs)


for _backend in NABLA_BACKENDS:
    for _label, _where, _val in (("nan-q", 0, float("nan")), ("inf-k", 1, float("inf")),
                                 ("overflow", 0, 3e38)):
        for _compiled in (False, True) if _label == "nan-q" else (False,):

            @case(f"nabla-{_backend}{'-compiled' if _compiled else ''}-rejects-{_label}")
            def _(_backend=_backend, _label=_label, _where=_where, _val=_val, _compiled=_compiled):
                q, k, _ = qkv(6)
                x = (q, k)[_where]
                if _label == "overflow":
                    x.mul_(_val)  # finite inputs whose block logits overflow fp32
                else:
                    x[0, 100, 1, 5] = _val
                rejects(lambda: _nabla(_backend, q, k, 0.9, compiled=_compiled), "finite block logits")

    for _thr in (float("nan"), 0.0, -0.5, 1.5, True, "0.9", float("inf")):

        @case(f"nabla-{_backend}-rejects-threshold-{_thr}")
        def _(_backend=_backend, _thr=_thr):
            q, k, _ = qkv()
            rejects(lambda: _nabla(_backend, q, k, _thr), "threshold")

    for _label, _kw, _msg in (
        ("sta-shape", dict(sta=torch.ones(NB + 1, NB + 1, dtype=torch.bool)), "sta must have shape"),
        ("sta-dtype", dict(sta=torch.ones(NB, NB)), "sta must have dtype"),
        ("token-valid-shape", dict(token_valid=torch.ones(S + 1, dtype=torch.bool)), "token_valid"),
        ("block-size-0", dict(block_size=0), "block_size"),
        ("block-size-odd", dict(block_size=48), "not a multiple"),
    ):

        @case(f"nabla-{_backend}-rejects-{_label}")
        def _(_backend=_backend, _kw=_kw, _msg=_msg):
            q, k, _ = qkv()
            rejects(lambda: _nabla(_backend, q, k, 0.9, **_kw), _msg)

    for _label, _offsets, _msg in (
        ("misaligned", [0, 100, S], r"cu_seqlens\[1\]=100 is not a multiple of block_size=64"),
        ("decreasing", [0, 128, 64], "non-decreasing"),
        ("past-s", [0, S + 64], "end <= S"),
        ("not-at-0", [64, S], "start at 0"),
    ):
        for _compiled in (False, True) if _label == "misaligned" else (False,):

            @case(f"nabla-{_backend}{'-compiled' if _compiled else ''}-rejects-cu-seqlens-{_label}")
            def _(_backend=_backend, _offsets=_offsets, _msg=_msg, _compiled=_compiled):
                q, k, _ = qkv()
                cu = torch.tensor(_offsets, dtype=torch.int32)
                rejects(lambda: _nabla(_backend, q, k, 0.9, compiled=_compiled, cu_seqlens=cu), _msg)


for _label, _grid, _kw, _msg in (
    ("grid-2-tuple", (2, 2), {}, "grid must be"),
    ("grid-wrong-product", (2, 2, 2), {}, r"read as the token grid \(T, H, W\)"),
    ("grid-in-tiles", (1, 2, 2), {}, r"\(T, h_tiles, w_tiles\) in 8x8-token tiles, which grid no longer"),
    ("grid-none-no-token-valid", None, dict(sta_window=None), "cannot tell padding"),
    ("grid-zero", (4, 0, 1), {}, "grid must be"),
    ("grid-none-with-window", None, {}, "needs grid"),
    ("window-even", (4, 1, 1), dict(sta_window=(2, 3, 3)), "odd"),
    ("window-int", (4, 1, 1), dict(sta_window=3), "sta_window"),
    ("layout-tile-4", kk.FractalLayout(4, 8, 8, tile=4), {}, "64-token blocks"),
    ("cu-seqlens-misaligned", (4, 8, 8),
     dict(sta_window=None, cu_seqlens=torch.tensor([0, 96, S], dtype=torch.int32)),
     r"cu_seqlens\[1\]=96 is not a multiple"),
):

    @case(f"nabla-attention-rejects-{_label}")
    def _(_grid=_grid, _kw=_kw, _msg=_msg):
        q, k, v = qkv()
        rejects(lambda: kk.nabla_attention(q, k, v, 0.9, grid=_grid, **_kw), _msg)


for _label, _args, _msg in (
    ("t-zero", (0, 2, 2), "t must be"),
    ("window-even", (2, 2, 2, (2, 3, 3)), "odd"),
    ("window-2", (2, 2, 2, (3, 3)), "three positive odd"),
    ("huge-grid", (2**20, 2**10, 2**10), "bool mask, more than"),
):

    @case(f"sta-rejects-{_label}")
    def _(_args=_args, _msg=_msg):
        rejects(lambda: kk.sta_block_mask(*_args), _msg)


# ------------------------------------------------------------------------------------ worker
def run(names: list[str]) -> None:
    for name in names:
        print(f"START {name}", flush=True)
        try:
            CASES[name]()
        except Skip as e:
            print(f"RESULT {name} SKIP {e}", flush=True)
        except BaseException as e:  # noqa: BLE001 - report every failure, keep going
            detail = "".join(traceback.format_exception_only(type(e), e)).strip().replace("\n", " | ")
            print(f"RESULT {name} FAIL {detail}", flush=True)
        else:
            print(f"RESULT {name} PASS", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    run(sys.argv[1:] or list(CASES))
