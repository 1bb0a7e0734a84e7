"""Fused block-sparse attention (the NABLA / STA attention of Kandinsky 5): custom ops, autograd glue,
validation and the public function.

Layers, bottom up:

Kernels: ``cpu`` (C++/OpenMP, ``csrc/block_sparse_attention.cpp``), ``triton``
    (:mod:`kandinsky_kernels.ops._bsa_triton`), ``reference`` (dense masked SDPA in fp32,
    :mod:`kandinsky_kernels.reference.attention`).
``kandinsky_kernels::block_sparse_attention_fwd``  custom op -> (out, lse, backend tag); chooses the
    backend when it runs (the rule: :mod:`kandinsky_kernels.backends`) and tags its outputs with it.
``kandinsky_kernels::block_sparse_attention_bwd``  custom op -> (dq, dk, dv) on the backend of the tag.
    Both have fake implementations and are tied together with ``register_autograd``, so
    ``torch.compile(fullgraph=True)`` sees one opaque node per direction.
:func:`block_sparse_attention`  validation + the public entry point.

NABLA mask and attention in one call, :func:`kandinsky_kernels.nabla_attention`, lives with the NABLA op
(:mod:`kandinsky_kernels.ops.nabla`).

Conventions shared by every backend: q, k, v, out (B, S, H, D); lse (B, H, S) fp32, natural log of
the softmax denominator of ``scale * q.k``, ``-inf`` for a row that sees no key (its output and
gradients are 0). Softmax statistics and accumulation are fp32 for every input dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kandinsky_kernels import _ext
from kandinsky_kernels._triton import HAS_TRITON
from kandinsky_kernels._validation import (
    bshd_hint,
    check_block_size,
    check_csr_contents,
    check_cu_seqlens,
    check_finite_number,
    check_same_device,
    check_tensor,
    check_token_index,
)
from kandinsky_kernels.backends import _backend_of_tag, _backend_tag, _fake_backend_tag, select_backend
from kandinsky_kernels.mask import BlockSparseMask, _transpose_csr
from kandinsky_kernels.ops import _bsa_triton
from kandinsky_kernels.reference.attention import (
    block_sparse_attention_backward_reference,
    block_sparse_attention_with_lse,
)
from kandinsky_kernels.reference.fractal import gather_positions_ref, scatter_positions_ref

__all__ = ["block_sparse_attention", "merge_attention"]

_OP = "block_sparse_attention"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256


def _backend(device: torch.device | str) -> str:
    """The backend a call on ``device`` runs on now: called inside the forward custom op, when it runs."""
    implemented = {
        "cpu": _ext.cpp_op("bsa_fwd") is not None and _ext.cpp_op("bsa_bwd") is not None,
        "triton": HAS_TRITON,
    }
    return select_backend(_OP, device, implemented)


def _unit_last(x: Tensor) -> Tensor:
    # Kernels take any (B, S, H) strides but need D contiguous.
    return x if x.stride(-1) == 1 else x.contiguous()


def _mask_of(kv_ptr, kv_cols, nk, block_size, token_valid) -> BlockSparseMask:
    return BlockSparseMask.from_csr(kv_ptr, kv_cols, nk, block_size, token_valid=token_valid)


# --------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("kandinsky_kernels::block_sparse_attention_fwd", mutates_args=())
def _fwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_ptr: Tensor,
    kv_cols: Tensor,
    block_size: int,
    scale: float,
    token_valid: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    token_index: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    backend = _backend(q.device)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    sq, sk = _positions(q, k, token_index)
    nk = sk // block_size
    # the C++ kernels check the same things themselves, but name per-side offsets only here
    if backend != "cpu" or (cu_seqlens is not None and cu_seqlens.dim() == 2):
        _check_contents(kv_ptr, kv_cols, nk, cu_seqlens, sq, sk)
    if token_index is not None:
        check_token_index(token_index, q.shape[1])
    if q.numel() == 0 or k.numel() == 0:  # nothing to compute (an empty tensor's strides may be anything)
        b, _, h, _ = q.shape
        out, lse = q.new_zeros(q.shape), q.new_full((b, h, sq), float("-inf"), dtype=torch.float32)
    elif backend == "cpu":
        out, lse = _ext.cpp_op("bsa_fwd")(
            q, k, v, kv_ptr.contiguous(), kv_cols.contiguous(), block_size, scale, token_valid, cu_seqlens,
            *_index_arg(token_index),
        )
    elif backend == "triton":
        out, lse = _bsa_triton.bsa_forward_triton(
            q, k, v, kv_ptr, kv_cols, block_size, scale, token_valid, cu_seqlens, token_index=token_index,
        )
    elif token_index is not None:  # the reference reads rows through copies, in position order
        mask = _mask_of(kv_ptr, kv_cols, nk, block_size, _index_valid(token_valid, token_index))
        qf, kf, vf = (gather_positions_ref(x, token_index) for x in (q, k, v))
        outf, lse = block_sparse_attention_with_lse(qf, kf, vf, mask, scale, cu_seqlens)
        out = scatter_positions_ref(outf, token_index, q.shape[1])
    else:
        mask = _mask_of(kv_ptr, kv_cols, nk, block_size, token_valid)
        out, lse = block_sparse_attention_with_lse(q, k, v, mask, scale, cu_seqlens)
    return out.contiguous(), lse.float().contiguous(), _backend_tag(backend)


def _positions(q: Tensor, k: Tensor, token_index: Optional[Tensor]) -> tuple[int, int]:
    """(Sq, Sk) in positions: the inputs' lengths, or the index's length for both sides."""
    if token_index is None:
        return q.shape[1], k.shape[1]
    return token_index.shape[0], token_index.shape[0]


def _index_arg(token_index: Optional[Tensor]) -> tuple:
    """The C++ ops' trailing ``token_index`` argument, passed only when there is one."""
    return () if token_index is None else (token_index,)


def _index_valid(token_valid: Optional[Tensor], token_index: Tensor) -> Tensor:
    """token_valid (positions) AND not a padding position of ``token_index``."""
    real = token_index >= 0
    return real if token_valid is None else token_valid & real


def _fake_fwd_outputs(q: Tensor, token_index: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """What a forward attention op returns, as fake tensors: out like q, lse fp32 (B, H, S) (S in
    positions: the index's length where there is one), the tag."""
    b, s, h, _ = q.shape
    if token_index is not None:
        s = token_index.shape[0]
    return q.new_empty(q.shape), q.new_empty((b, h, s), dtype=torch.float32), _fake_backend_tag()


@_fwd_op.register_fake
def _(q, k, v, kv_ptr, kv_cols, block_size, scale, token_valid, cu_seqlens, token_index=None):
    return _fake_fwd_outputs(q, token_index)


@torch.library.custom_op("kandinsky_kernels::block_sparse_attention_bwd", mutates_args=())
def _bwd_op(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    kv_ptr: Tensor,
    kv_cols: Tensor,
    q_ptr: Tensor,
    q_cols: Tensor,
    block_size: int,
    scale: float,
    token_valid: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    backend_tag: Tensor,
    dlse: Optional[Tensor] = None,
    token_index: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    # The forward's backend, not a new choice: lse and out are that backend's, and the backward may run
    # outside the use_backend() block of the forward (or on an autograd thread that does not see it).
    backend = _backend_of_tag(backend_tag)
    dout, q, k, v, out = (_unit_last(x) for x in (dout, q, k, v, out))
    sq, sk = _positions(q, k, token_index)
    nq, nk = sq // block_size, sk // block_size
    if backend != "cpu":
        _check_contents(kv_ptr, kv_cols, nk, cu_seqlens, sq, sk)
        check_csr_contents(q_ptr, q_cols, nq, name="transposed mask")
    if token_index is not None:
        check_token_index(token_index, q.shape[1])
    if q.numel() == 0 or k.numel() == 0:
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    if dlse is not None:
        dlse = dlse.float().contiguous()
    if backend == "cpu":
        dq, dk, dv = _ext.cpp_op("bsa_bwd")(
            dout, q, k, v, out, lse.contiguous(), kv_ptr.contiguous(), kv_cols.contiguous(),
            q_ptr.contiguous(), q_cols.contiguous(), block_size, scale, token_valid, cu_seqlens, dlse,
            *_index_arg(token_index),
        )
    elif backend == "triton":
        dq, dk, dv = _bsa_triton.bsa_backward_triton(
            dout, q, k, v, out, lse, kv_ptr, kv_cols, q_ptr, q_cols,
            block_size, scale, token_valid, cu_seqlens, dlse=dlse, token_index=token_index,
        )
    elif token_index is not None:
        mask = _mask_of(kv_ptr, kv_cols, nk, block_size, _index_valid(token_valid, token_index))
        grads = block_sparse_attention_backward_reference(
            *(gather_positions_ref(x, token_index) for x in (dout, q, k, v)), mask, scale, cu_seqlens, dlse=dlse)
        dq, dk, dv = (scatter_positions_ref(g, token_index, q.shape[1]) for g in grads)
    else:
        mask = _mask_of(kv_ptr, kv_cols, nk, block_size, token_valid)
        dq, dk, dv = block_sparse_attention_backward_reference(dout, q, k, v, mask, scale, cu_seqlens,
                                                               dlse=dlse)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_bwd_op.register_fake
def _(dout, q, k, v, out, lse, kv_ptr, kv_cols, q_ptr, q_cols, block_size, scale, token_valid, cu_seqlens,
      backend_tag, dlse=None, token_index=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_ptr, kv_cols, block_size, scale, token_valid, cu_seqlens, *rest = inputs
    out, lse, tag = output
    # the compressed mask is what stays alive until the backward (memory in proportion to its blocks)
    ctx.save_for_backward(q, k, v, out, lse, kv_ptr, kv_cols, token_valid, cu_seqlens, tag,
                          rest[0] if rest else None)
    ctx.block_size, ctx.scale = block_size, scale
    # an output nobody differentiated gets None, not a zero tensor: the common case (lse unused) then
    # costs nothing
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse, dtag):
    # dlse: the gradient of lse where the caller used it (return_lse=True), folded into Delta by every
    # backend; the tag is an integer, without gradient.
    q, k, v, out, lse, kv_ptr, kv_cols, token_valid, cu_seqlens, tag, token_index = ctx.saved_tensors
    if dout is None and dlse is None:
        return (None,) * 10
    if dout is None:
        dout = torch.zeros_like(out)
    # the transpose lives only while this layer's backward runs (built by a kernel, O(nnz))
    q_ptr, q_cols = _transpose_csr(kv_ptr, kv_cols, _positions(q, k, token_index)[1] // ctx.block_size)
    dq, dk, dv = _bwd_op(
        dout, q, k, v, out, lse, kv_ptr, kv_cols, q_ptr, q_cols, ctx.block_size, ctx.scale, token_valid,
        cu_seqlens, tag, dlse, token_index,
    )
    return dq, dk, dv, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------- validation
def _check_contents(kv_ptr, kv_cols, nk: int, cu_seqlens, sq: int, sk: int) -> None:
    """The data-dependent checks, run where the kernels run: inside the custom ops (so also under
    torch.compile, whose tracing sees no values). The mask is checked once while it stays unchanged
    (see check_mask_contents). ``cu_seqlens``: (n+1,) for both sides, or (2, n+1) query / key offsets."""
    check_csr_contents(kv_ptr, kv_cols, nk)
    if cu_seqlens is not None:
        if cu_seqlens.dim() == 2:
            check_cu_seqlens(cu_seqlens[0], sq, "cu_seqlens_q")
            check_cu_seqlens(cu_seqlens[1], sk, "cu_seqlens_k")
        else:
            check_cu_seqlens(cu_seqlens, sq)


def _check_token_index_arg(token_index, q, k, cu_seqlens) -> None:
    """The checks of ``token_index`` that need no values (its contents are checked in the ops)."""
    check_tensor("token_index", token_index, ndim=1, dtypes=(torch.int64,))
    if token_index.device != q.device:
        raise ValueError(f"token_index on {token_index.device} but q on {q.device}")
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"token_index reads q, k and v through one index (self-attention): k, v must have "
                         f"q's {q.shape[1]} rows, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if cu_seqlens.get("cu_seqlens_q") is not None:
        raise ValueError("token_index is for self-attention: pass cu_seqlens (in positions), not "
                         "cu_seqlens_q / cu_seqlens_k")


def _validate(q, k, v, mask, cu_seqlens, scale, token_index=None) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, ndim=4, dtypes=_DTYPES)
    hq, hkv = q.shape[2], k.shape[2]
    if (k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]
            or (hkv == 0) != (hq == 0) or (hkv and hq % hkv)):
        raise ValueError(
            f"q (B, Sq, H_q, D), k and v (B, Sk, H_kv, D) must share one B and D, k and v one shape, with "
            f"H_kv dividing H_q (GQA/MQA), got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q=q, k=k, v=v)
    b, s, h, d = q.shape
    sk = k.shape[1]
    if token_index is not None:  # shapes below are in positions: the sequence the kernels see
        _check_token_index_arg(token_index, q, k, cu_seqlens)
        s = sk = token_index.shape[0]
    if d <= 0 or d % 16 or d > _MAX_HEAD_DIM:
        raise ValueError(f"head dim D={d} (q shape {tuple(q.shape)}) must be a positive multiple of 16, "
                         f"at most {_MAX_HEAD_DIM}")
    if scale is not None:
        check_finite_number("scale", scale)
    if not isinstance(mask, BlockSparseMask):
        raise ValueError(f"mask must be a BlockSparseMask, got {type(mask).__name__}")
    bs = check_block_size(mask.block_size, "mask block_size")
    if token_index is not None and s % bs:
        raise ValueError(f"token_index holds Sf={s} positions, not a multiple of the mask block_size={bs} "
                         "(a FractalLayout's token_index() holds whole blocks)")
    for name, x in (("q", q), ("k", k)):
        if token_index is None and x.shape[1] % bs:
            hint = bshd_hint(name, x.shape, bs)
            raise ValueError(f"{name} has shape (B, S, H, D) = {tuple(x.shape)}: S={x.shape[1]} is not a multiple "
                             f"of the mask block_size={bs}" + (hint or "; pad the sequence (e.g. fractal_flatten "
                                                               "pads to tiles)"))
    mb, mh, nq, nk = mask.shape
    if token_index is not None and (nq * bs != s or nk * bs != sk or mb not in (1, b) or mh not in (1, h)):
        raise ValueError(
            f"mask shape (B, H, Nq, Nk)={mask.shape} with block_size {bs} does not fit token_index's Sf={s} "
            f"positions and q (B, Sr, H, D) = {tuple(q.shape)}: need Nq = Nk = Sf / block_size = {s // bs}, "
            f"mask B in (1, {b}), mask H in (1, {h})")
    if nq * bs != s or nk * bs != sk or mb not in (1, b) or mh not in (1, h):
        hint = ""
        if nq * bs == q.shape[2] != s and nk * bs == k.shape[2]:
            hint = "; the mask fits dim 2 of q as S: did you pass (B, H, S, D)? use q.transpose(1, 2)"
        raise ValueError(
            f"mask shape (B, H, Nq, Nk)={mask.shape} with block_size {bs} does not fit q (B, Sq, H, D) = "
            f"{tuple(q.shape)} and k (B, Sk, H_kv, D) = {tuple(k.shape)}: need Nq = Sq / block_size = {s // bs}, "
            f"Nk = Sk / block_size = {sk // bs}, mask B in (1, {b}), mask H in (1, {h})" + hint
        )
    if mask.device != q.device:
        raise ValueError(f"mask on {mask.device} but q on {q.device}")
    for name, cu in cu_seqlens.items():
        if cu is None:
            continue
        check_tensor(name, cu, ndim=1, dtypes=(torch.int32,))
        if cu.device != q.device:
            raise ValueError(f"{name} on {cu.device} but q on {q.device}")
        if cu.numel() < 2:
            raise ValueError(f"{name} needs at least 2 offsets (n+1 for n videos), got {cu.numel()}")
        if b != 1:
            raise ValueError(f"{name} packs videos along S and needs B == 1, got q shape {tuple(q.shape)}")
    if cu_seqlens["cu_seqlens"] is not None and sk != s:
        raise ValueError(f"cu_seqlens packs self-attention (Sq == Sk), got Sq={s}, Sk={sk}; pass "
                         f"cu_seqlens_q and cu_seqlens_k for queries and keys packed apart")


# ------------------------------------------------------------------------------------- public API
def _packed_offsets(cu_seqlens, cu_seqlens_q, cu_seqlens_k) -> Tensor | None:
    """The kernels' one offsets argument: (n+1,) for both sides, or (2, n+1) query / key offsets
    (each already validated)."""
    _check_offset_args(cu_seqlens, cu_seqlens_q, cu_seqlens_k)
    if cu_seqlens_q is None:
        return cu_seqlens
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k {tuple(cu_seqlens_k.shape)} "
                         f"must hold the same number of videos")
    return torch.stack([cu_seqlens_q, cu_seqlens_k])


def _check_offset_args(cu_seqlens, cu_seqlens_q, cu_seqlens_k) -> None:
    if cu_seqlens is not None and (cu_seqlens_q is not None or cu_seqlens_k is not None):
        raise ValueError("pass cu_seqlens (queries and keys packed alike) or cu_seqlens_q and cu_seqlens_k, "
                         "not both")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k go together (video i's queries see video i's keys); "
                         f"got only {'cu_seqlens_q' if cu_seqlens_k is None else 'cu_seqlens_k'}")


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: BlockSparseMask,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
    *,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    return_lse: bool = False,
    token_index: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention restricted to the active blocks of ``mask``, softmax over the visible keys only.

    Args:
        q: (batch B, seq Sq, heads H, head_dim D); k, v: (B, Sk, H_kv, D), the layout of flash-attn
            and of the model, any strides. fp32, fp16 or bf16 (one dtype for all three); D a multiple
            of 16, at most 256. Sk may differ from Sq (cross or joint attention, e.g. video queries
            over text + video keys), with a rectangular mask.
            GQA / MQA: k and v may have H_kv heads with H_kv dividing H (query head h reads key/value
            head h // (H / H_kv), as flash-attn does); their gradients sum over the sharing query
            heads. K and V are expanded to H heads before the kernels (one copy of each); kernels that
            read shared heads in place are not written yet.
        mask: :class:`BlockSparseMask` with Nq = Sq / block_size query blocks and Nk = Sk /
            block_size key blocks; block_size one of 16, 32, 64 (Kandinsky 5's), 128, on every
            backend. Its B may be 1 or B and its
            H 1 or H (broadcast). ``mask.token_valid`` (1 or B, Sk) (False = pad key) removes keys: a
            pad key is never attended to. A key part every query sees (text tokens, say) is a run of
            key blocks active in every row (:meth:`BlockSparseMask.with_dense_keys`).
        scale: softmax scale, default 1/sqrt(D).
        cu_seqlens: optional int32 (n+1,) offsets of n videos packed along S (self-attention: needs
            B == 1 and Sq == Sk). Token i
            sees key j only if both lie in the same video, their blocks are active and j is valid;
            blocks may straddle video boundaries. Tokens past ``cu_seqlens[-1]`` see nothing.
        cu_seqlens_q, cu_seqlens_k: instead of ``cu_seqlens``, int32 (n+1,) offsets of the n videos'
            queries along Sq and of their keys along Sk (as flash-attn's varlen API; Sq != Sk
            allowed): query token i of video a sees key j only if j lies in video a's key range.
        return_lse: also return the log-sum-exp of each query row's visible scores (natural log,
            scores = scale * q.k), differentiable, so partial attentions over disjoint key sets can be
            merged exactly (:func:`merge_attention`, as ring / context-parallel attention does).
        token_index: optional int64 (Sf,) for tokens held in another order than the mask's (a
            raster-order model, a mask in fractal order): position p of the sequence the mask
            describes reads row ``token_index[p]`` of q, k and v, -1 marks a padding position (read as
            zeros, never attended to, written nowhere), and each output row is written from its
            position. Self-attention: q, k, v (B, Sr, H, D) with one Sr; every row 0 .. Sr - 1 must
            appear exactly once. The mask, ``mask.token_valid``, ``cu_seqlens`` and lse are in
            positions (Nq = Nk = Sf / block_size, lse (B, H, Sf)). The kernels read and write through
            the index: no copy of q, k, v or the output in the mask's order is made.
            :meth:`kandinsky_kernels.FractalLayout.token_index` gives the index of a (T, H, W) grid in
            raster order; :func:`kandinsky_kernels.nabla_attention` takes ``order="raster"``.

    Returns:
        (B, Sq, H, D), contiguous, in q's dtype (with ``token_index``: (B, Sr, H, D), rows as q's). A query row that sees no key returns zeros (and zero
        gradients), never NaN. Differentiable in q, k and v. With ``return_lse``: ``(out, lse)``, lse
        fp32 (B, H, Sq), -inf for a row that sees no key.

    Raises:
        ValueError: a wrong shape, dtype, device or scale; a malformed mask (a count outside
            [0, Nk], an active index outside [0, Nk) or repeated in its row); ``cu_seqlens`` not
            starting at 0, decreasing or ending past S. The data-dependent checks run wherever the
            kernels run, also under ``torch.compile`` (on a GPU: one host sync per new mask).

    Non-finite inputs behave as in torch's SDPA: a query row whose visible scores hold a NaN, or an
    inf that meets another inf, is NaN in the output and in lse, and the backward returns NaN for
    the inputs that row touched; an inf in v gives +-inf where it is weighted. The fused kernels never
    read key blocks a row does not see, so values there cannot reach it (the dense ``reference``
    backend, like SDPA with a boolean mask, multiplies them by zero and may turn more rows NaN).

    Backends (see :mod:`kandinsky_kernels.backends`): ``cpu`` (C++/OpenMP), ``triton``,
    ``reference`` (dense fp32 masked SDPA, O(S^2) memory), chosen when the call runs (also inside a
    compiled graph); the backward runs on the forward's backend.
    """
    _check_offset_args(cu_seqlens, cu_seqlens_q, cu_seqlens_k)
    _validate(q, k, v, mask, {"cu_seqlens": cu_seqlens, "cu_seqlens_q": cu_seqlens_q,
                              "cu_seqlens_k": cu_seqlens_k}, scale, token_index)
    cu_seqlens = _packed_offsets(cu_seqlens, cu_seqlens_q, cu_seqlens_k)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not isinstance(return_lse, bool):
        raise ValueError(f"return_lse must be True or False, got {return_lse!r}")
    group = q.shape[2] // k.shape[2] if k.shape[2] else 1
    if group > 1:  # autograd of repeat_interleave sums dK, dV over the query heads sharing a head
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    out, lse, _ = _fwd_op(q, k, v, mask.kv_ptr, mask.kv_cols, mask.block_size, scale, mask.token_valid, cu_seqlens,
                          token_index)
    return (out, lse) if return_lse else out


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Attention over the union of two disjoint key sets from the two partial results.

    out_a, out_b: (B, S, H, D); lse_a, lse_b: fp32 (B, H, S), as ``block_sparse_attention(...,
    return_lse=True)`` returns them (natural log). Returns ``(out, lse)``: out (B, S, H, D) in out_a's
    dtype, computed in fp32 as ``out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)`` with
    ``lse = logaddexp(lse_a, lse_b)``; a row that sees nothing in both parts stays zeros with lse -inf.
    Differentiable (plain torch ops), so gradients reach both partial attentions through out and lse.
    """
    for name, t in (("out_b", out_b),):
        if t.shape != out_a.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected out_a's {tuple(out_a.shape)}")
    b, s, h, _ = out_a.shape
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if t.shape != (b, h, s):
            raise ValueError(f"{name} must have shape (B, H, S) = {(b, h, s)}, got {tuple(t.shape)}")
    la, lb = lse_a.float(), lse_b.float()
    # rows empty in both parts: logaddexp(-inf, -inf) has a NaN gradient, so they take a finite stand-in
    # and are put back to -inf by a where (whose backward sends them zero)
    empty = torch.isneginf(la) & torch.isneginf(lb)
    zero = torch.zeros_like(la)
    safe = torch.logaddexp(torch.where(empty, zero, la), torch.where(empty, zero, lb))
    lse = torch.where(empty, torch.full_like(la, float("-inf")), safe)
    finite = ~empty
    wa = torch.where(finite, torch.exp(torch.where(empty, zero, la) - safe), zero)
    wb = torch.where(finite, torch.exp(torch.where(empty, zero, lb) - safe), zero)
    out = out_a.float() * wa.transpose(1, 2)[..., None] + out_b.float() * wb.transpose(1, 2)[..., None]
    return out.to(out_a.dtype), lse
