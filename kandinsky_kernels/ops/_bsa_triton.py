"""Triton kernels of fused block-sparse attention (FlashAttention-2 scheme over a BlockSparseMask):
the forward, the backward's preprocess, dK/dV and dQ kernels, their autotune tables and launchers.

Used by the ``triton`` backend of :mod:`kandinsky_kernels.ops.block_sparse_attention` (custom ops,
validation and the public function live there); callable directly for tests and benchmarks.

Design trade-off: every program owns one query tile (forward, dQ) or one key tile (dK/dV) lying inside a
single mask block and walks only that block's active partner blocks through the mask's compressed rows
(``kv_cols`` / the transposed ``q_cols``), so work is proportional to the number of active blocks
and the default backward needs no atomics (``KANDINSKY_BSA_TRITON_BWD=atomic`` trades them for two
fewer tile products: see :func:`triton_backward_scheme`). Tiles never straddle mask blocks (BLOCK_M,
BLOCK_N divide ``block_size``): a 128-row tile over 64-token blocks would have to merge two different
key lists. Masking inside a block exists only for pad keys (``token_valid``) and packed-sequence
boundaries (``cu_seqlens``); both are constexpr flags, so the dense-block path does no per-element work.
The tile tables and their pruning rule are shared by the forward and backward kernels, which is why
both directions live in this one module.

Layout: q, k, v, out, do, dq, dk, dv are (B, S, H, D) with arbitrary strides; lse and delta are fp32
(B, H, S). Mask tensors may broadcast over batch and heads (stride 0).

``token_index`` (int64 (Sf,), optional; the ``HAS_INDEX`` constexpr): the kernels walk positions
0..Sf-1 (mask blocks, lse, delta, token_valid, segments) and read/write row ``token_index[p]`` of the
raster (B, Sr, H, D) tensors, so a raster-order caller needs no gather/scatter copies. -1 positions
load zeros, store nowhere (masked), and the launcher ANDs them into token_valid as pad keys. Without
the index the constexpr removes every trace of it (same instructions as before).

Under the Triton interpreter (CPU tensors) bf16 multiplies and ``tl.dot`` are computed wrongly, so the
launchers set ``UPCAST`` there and every tile is converted to fp32 right after loading. On a GPU the dots
take the input dtype with fp32 accumulation (fp32 inputs use exact ``ieee`` dots, not tf32).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from kandinsky_kernels._triton import HAS_TRITON, INTERPRET, tl, triton
from kandinsky_kernels._validation import check_token_index

__all__ = ["bsa_forward_triton", "bsa_backward_triton", "triton_backward_scheme", "fixed_config"]

_LOG2E = 1.4426950408889634
_BLOCK_SIZES = (16, 32, 64, 128)
# Set KANDINSKY_BSA_AUTOTUNE=0 to launch the fixed default tiles on the GPU too (faster first call).
_AUTOTUNE = os.environ.get("KANDINSKY_BSA_AUTOTUNE", "1") != "0"

if HAS_TRITON:

    @triton.jit
    def _load(ptrs, d_mask, EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_mask, other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _load_rows(base, rows, stride_s, offs_d, stride_d, ROWS_FIRST: tl.constexpr, d_ok,
                   UPCAST: tl.constexpr):
        """A tile of the raster rows ``rows`` (int64, -1 = padding: zeros) of ``base``: (rows, D) when
        ROWS_FIRST, else transposed (D, rows). Only with a token index."""
        row_ok = rows >= 0
        r = tl.maximum(rows, 0) * stride_s  # keep the masked addresses in bounds
        if ROWS_FIRST:
            x = tl.load(base + r[:, None] + offs_d[None, :] * stride_d,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            x = tl.load(base + r[None, :] + offs_d[:, None] * stride_d,
                        mask=row_ok[None, :] & d_ok[:, None], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _store_rows(base, rows, stride_s, offs_d, stride_d, d_ok, x):
        """Store the (rows, D) tile ``x`` into the raster rows ``rows``; rows -1 are written nowhere."""
        r = tl.maximum(rows, 0) * stride_s
        tl.store(base + r[:, None] + offs_d[None, :] * stride_d, x.to(base.dtype.element_ty),
                 mask=(rows >= 0)[:, None] & d_ok[None, :])

    # ------------------------------------------------------------------------------------ forward
    @triton.jit
    def _bsa_fwd_kernel(
        Q, K, V, Out, Lse, KVPtr, KVCols, TokValid, QSeg, KSeg, TokIdx,
        stride_qb, stride_qs, stride_qh, stride_qd,
        stride_kb, stride_ks, stride_kh, stride_kd,
        stride_vb, stride_vs, stride_vh, stride_vd,
        stride_ob, stride_os, stride_oh, stride_od,
        stride_nb, stride_nh,
        stride_tb,
        H, S_Q, qk_scale,
        D: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        HAS_TOKEN_VALID: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_INDEX: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # HAS_INDEX: position p of the sequence (mask blocks, lse, token_valid, segments) is raster row
        # TokIdx[p] of q, k, v, out (-1: zeros in, written nowhere; the launcher marks it a pad key).
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        start_m = pid_m * BLOCK_M
        qb = start_m // BLOCK_SIZE
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D

        if HAS_INDEX:
            q_rows = tl.load(TokIdx + start_m + offs_m)
            q = _load_rows(Q + b * stride_qb + h * stride_qh, q_rows, stride_qs, offs_d, stride_qd, True,
                           d_ok, UPCAST)
            k_head = K + b * stride_kb + h * stride_kh
            v_head = V + b * stride_vb + h * stride_vh
        else:
            q_ptrs = (Q + b * stride_qb + h * stride_qh + start_m.to(tl.int64) * stride_qs
                      + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd)
            q = _load(q_ptrs, d_ok[None, :], EVEN_D, UPCAST)
            k_base = (K + b * stride_kb + h * stride_kh
                      + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd)
            v_base = (V + b * stride_vb + h * stride_vh
                      + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd)
        if IS_VARLEN:
            qseg = tl.load(QSeg + start_m + offs_m)

        # compressed rows: this query block's key-block ids are KVCols[row_start : row_end]
        row_ptr = KVPtr + b * stride_nb + h * stride_nh + qb
        row_start = tl.load(row_ptr)
        num_kv = (tl.load(row_ptr + 1) - row_start).to(tl.int32)
        idx_ptr = KVCols + row_start
        sub = BLOCK_SIZE // BLOCK_N  # key tiles per mask block

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # One flat loop over (active block, sub-tile) keeps the loop pipelinable.
        for it in range(0, num_kv * sub):
            kb = tl.load(idx_ptr + (it // sub)).to(tl.int32)
            start_n = kb * BLOCK_SIZE + (it % sub) * BLOCK_N
            if HAS_INDEX:
                k_rows = tl.load(TokIdx + start_n + offs_n)
                kt = _load_rows(k_head, k_rows, stride_ks, offs_d, stride_kd, False, d_ok, UPCAST)
                v = _load_rows(v_head, k_rows, stride_vs, offs_d, stride_vd, True, d_ok, UPCAST)
            else:
                kt = _load(k_base + start_n.to(tl.int64) * stride_ks, d_ok[:, None], EVEN_D, UPCAST)
                v = _load(v_base + start_n.to(tl.int64) * stride_vs, d_ok[None, :], EVEN_D, UPCAST)
            qk = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # log2 domain
            if HAS_TOKEN_VALID:
                tv = tl.load(TokValid + b * stride_tb + start_n + offs_n)
                qk = tl.where(tv[None, :] != 0, qk, float("-inf"))
            if IS_VARLEN:
                kseg = tl.load(KSeg + start_n + offs_n)
                qk = tl.where(qseg[:, None] == kseg[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            if HAS_TOKEN_VALID or IS_VARLEN:
                # A row that has seen only masked keys keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_use = m_new
            alpha = tl.math.exp2(m_i - m_use)
            p = tl.math.exp2(qk - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
            m_i = m_new

        # Rows with no visible key have l = 0 and acc = 0: output exactly 0, lse = -inf. A row that met
        # a NaN (or inf - inf) score has l = NaN and keeps it, in out and lse, so the backward sees it too.
        has_key = l_i != 0.0
        l_safe = tl.where(has_key, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(has_key, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        if HAS_INDEX:
            _store_rows(Out + b * stride_ob + h * stride_oh, q_rows, stride_os, offs_d, stride_od, d_ok, out)
        else:
            o_ptrs = (Out + b * stride_ob + h * stride_oh + start_m.to(tl.int64) * stride_os
                      + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od)
            if EVEN_D:
                tl.store(o_ptrs, out.to(Out.dtype.element_ty))
            else:
                tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=d_ok[None, :])
        tl.store(Lse + (b * H + h) * S_Q + start_m + offs_m, lse)

    # ----------------------------------------------------------------------------------- backward
    @triton.jit
    def _bsa_bwd_preprocess_kernel(
        Out, DO, Delta, TokIdx,
        stride_ob, stride_os, stride_oh, stride_od,
        stride_db, stride_ds, stride_dh, stride_dd,
        H, S_Q,
        D: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
        HAS_INDEX: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        start_m = pid_m * BLOCK_M
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        if HAS_INDEX:
            rows = tl.load(TokIdx + start_m + offs_m)
            o = _load_rows(Out + b * stride_ob + h * stride_oh, rows, stride_os, offs_d, stride_od, True,
                           d_ok, True)
            do = _load_rows(DO + b * stride_db + h * stride_dh, rows, stride_ds, offs_d, stride_dd, True,
                            d_ok, True)
        else:
            o = _load(Out + b * stride_ob + h * stride_oh + start_m.to(tl.int64) * stride_os
                      + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
                      d_ok[None, :], EVEN_D, True)
            do = _load(DO + b * stride_db + h * stride_dh + start_m.to(tl.int64) * stride_ds
                       + offs_m[:, None] * stride_ds + offs_d[None, :] * stride_dd,
                       d_ok[None, :], EVEN_D, True)
        tl.store(Delta + (b * H + h) * S_Q + start_m + offs_m, tl.sum(o * do, 1))

    @triton.jit
    def _bsa_bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, DQA, Lse, Delta, QPtr, QCols, TokValid, QSeg, KSeg, TokIdx,
        stride_qb, stride_qs, stride_qh, stride_qd,
        stride_kb, stride_ks, stride_kh, stride_kd,
        stride_vb, stride_vs, stride_vh, stride_vd,
        stride_db, stride_ds, stride_dh, stride_dd,
        stride_dkb, stride_dks, stride_dkh, stride_dkd,
        stride_dvb, stride_dvs, stride_dvh, stride_dvd,
        stride_ab, stride_as, stride_ah, stride_ad,
        stride_nb, stride_nh,
        stride_tb,
        H, S_Q, qk_scale, sm_scale,
        D: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        HAS_TOKEN_VALID: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_INDEX: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # ATOMIC_DQ: also add each walked query tile's share of dQ (dS^T K, fp32) into DQA with atomics,
        # 5 products per tile pair instead of the 4 here plus 3 in the dQ kernel; DQA (B, S, H, D) fp32
        # must start at zero. Otherwise DQA is never touched.
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        start_n = pid_n * BLOCK_N
        kb = start_n // BLOCK_SIZE
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D

        if HAS_INDEX:
            k_rows = tl.load(TokIdx + start_n + offs_n)
            k = _load_rows(K + b * stride_kb + h * stride_kh, k_rows, stride_ks, offs_d, stride_kd, True,
                           d_ok, UPCAST)
            v = _load_rows(V + b * stride_vb + h * stride_vh, k_rows, stride_vs, offs_d, stride_vd, True,
                           d_ok, UPCAST)
            q_head = Q + b * stride_qb + h * stride_qh
            do_head = DO + b * stride_db + h * stride_dh
        else:
            row_n = start_n.to(tl.int64) + offs_n[:, None]
            k = _load(K + b * stride_kb + h * stride_kh + row_n * stride_ks + offs_d[None, :] * stride_kd,
                      d_ok[None, :], EVEN_D, UPCAST)
            v = _load(V + b * stride_vb + h * stride_vh + row_n * stride_vs + offs_d[None, :] * stride_vd,
                      d_ok[None, :], EVEN_D, UPCAST)
            qt_base = (Q + b * stride_qb + h * stride_qh
                       + offs_m[None, :] * stride_qs + offs_d[:, None] * stride_qd)
            do_base = (DO + b * stride_db + h * stride_dh
                       + offs_m[:, None] * stride_ds + offs_d[None, :] * stride_dd)
        row_stat = Lse + (b * H + h) * S_Q
        delta_base = Delta + (b * H + h) * S_Q
        if IS_VARLEN:
            kseg = tl.load(KSeg + start_n + offs_n)
        if ATOMIC_DQ:
            if HAS_INDEX:
                dqa_head = DQA + b * stride_ab + h * stride_ah
            else:
                dqa_base = (DQA + b * stride_ab + h * stride_ah
                            + offs_m[:, None] * stride_as + offs_d[None, :] * stride_ad)
            if HAS_TOKEN_VALID:
                # dQ reads every key row of dS^T, so pad keys are masked in the loop, not only at the end
                key_ok = tl.load(TokValid + b * stride_tb + start_n + offs_n) != 0

        # the transposed mask's row of this key block: query-block ids QCols[row_start : row_end]
        row_ptr = QPtr + b * stride_nb + h * stride_nh + kb
        row_start = tl.load(row_ptr)
        num_q = (tl.load(row_ptr + 1) - row_start).to(tl.int32)
        idx_ptr = QCols + row_start
        sub = BLOCK_SIZE // BLOCK_M

        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for it in range(0, num_q * sub):
            qblk = tl.load(idx_ptr + (it // sub)).to(tl.int32)
            start_m = qblk * BLOCK_SIZE + (it % sub) * BLOCK_M
            if HAS_INDEX:
                q_rows = tl.load(TokIdx + start_m + offs_m)
                qt = _load_rows(q_head, q_rows, stride_qs, offs_d, stride_qd, False, d_ok, UPCAST)
                do = _load_rows(do_head, q_rows, stride_ds, offs_d, stride_dd, True, d_ok, UPCAST)
            else:
                qt = _load(qt_base + start_m.to(tl.int64) * stride_qs, d_ok[:, None], EVEN_D, UPCAST)
                do = _load(do_base + start_m.to(tl.int64) * stride_ds, d_ok[None, :], EVEN_D, UPCAST)
            lse = tl.load(row_stat + start_m + offs_m)
            # Rows that saw no key (lse = -inf) must get P = 0: exp2(s - inf) = 0.
            lse = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            delta = tl.load(delta_base + start_m + offs_m)
            pt = tl.math.exp2(tl.dot(k, qt, input_precision=DOT_PREC) * qk_scale - lse[None, :])
            if IS_VARLEN:
                qseg = tl.load(QSeg + start_m + offs_m)
                pt = tl.where(kseg[:, None] == qseg[None, :], pt, 0.0)
            dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            dst = pt * (dpt - delta[None, :])
            dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PREC)
            if ATOMIC_DQ:
                if HAS_TOKEN_VALID:
                    dst = tl.where(key_ok[:, None], dst, 0.0)
                dq = tl.dot(tl.trans(dst.to(k.dtype)), k, input_precision=DOT_PREC) * sm_scale
                if HAS_INDEX:
                    # rows -1 (padding positions) are added nowhere
                    dqa_ptrs = (dqa_head + tl.maximum(q_rows, 0)[:, None] * stride_as
                                + offs_d[None, :] * stride_ad)
                    tl.atomic_add(dqa_ptrs, dq, mask=(q_rows >= 0)[:, None] & d_ok[None, :], sem="relaxed")
                else:
                    dqa_ptrs = dqa_base + start_m.to(tl.int64) * stride_as
                    if EVEN_D:
                        tl.atomic_add(dqa_ptrs, dq, sem="relaxed")
                    else:
                        tl.atomic_add(dqa_ptrs, dq, mask=d_ok[None, :], sem="relaxed")

        dk = dk * sm_scale
        if HAS_TOKEN_VALID:
            # Pad keys are key-side only: their rows of dK/dV are zero, and no other row depends on
            # them here, so masking once at the end replaces per-element masking in the loop.
            tv = tl.load(TokValid + b * stride_tb + start_n + offs_n)
            dk = tl.where(tv[:, None] != 0, dk, 0.0)
            dv = tl.where(tv[:, None] != 0, dv, 0.0)
        if HAS_INDEX:
            _store_rows(DK + b * stride_dkb + h * stride_dkh, k_rows, stride_dks, offs_d, stride_dkd,
                        d_ok, dk)
            _store_rows(DV + b * stride_dvb + h * stride_dvh, k_rows, stride_dvs, offs_d, stride_dvd,
                        d_ok, dv)
        else:
            dk_ptrs = DK + b * stride_dkb + h * stride_dkh + row_n * stride_dks + offs_d[None, :] * stride_dkd
            dv_ptrs = DV + b * stride_dvb + h * stride_dvh + row_n * stride_dvs + offs_d[None, :] * stride_dvd
            if EVEN_D:
                tl.store(dk_ptrs, dk.to(DK.dtype.element_ty))
                tl.store(dv_ptrs, dv.to(DV.dtype.element_ty))
            else:
                tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=d_ok[None, :])
                tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=d_ok[None, :])

    @triton.jit
    def _bsa_bwd_dq_kernel(
        Q, K, V, DO, DQ, Lse, Delta, KVPtr, KVCols, TokValid, QSeg, KSeg, TokIdx,
        stride_qb, stride_qs, stride_qh, stride_qd,
        stride_kb, stride_ks, stride_kh, stride_kd,
        stride_vb, stride_vs, stride_vh, stride_vd,
        stride_db, stride_ds, stride_dh, stride_dd,
        stride_dqb, stride_dqs, stride_dqh, stride_dqd,
        stride_nb, stride_nh,
        stride_tb,
        H, S_Q, qk_scale, sm_scale,
        D: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        HAS_TOKEN_VALID: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_INDEX: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        start_m = pid_m * BLOCK_M
        qb = start_m // BLOCK_SIZE
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D

        if HAS_INDEX:
            q_rows = tl.load(TokIdx + start_m + offs_m)
            q = _load_rows(Q + b * stride_qb + h * stride_qh, q_rows, stride_qs, offs_d, stride_qd, True,
                           d_ok, UPCAST)
            do = _load_rows(DO + b * stride_db + h * stride_dh, q_rows, stride_ds, offs_d, stride_dd, True,
                            d_ok, UPCAST)
        else:
            row_m = start_m.to(tl.int64) + offs_m[:, None]
            q = _load(Q + b * stride_qb + h * stride_qh + row_m * stride_qs + offs_d[None, :] * stride_qd,
                      d_ok[None, :], EVEN_D, UPCAST)
            do = _load(DO + b * stride_db + h * stride_dh + row_m * stride_ds + offs_d[None, :] * stride_dd,
                       d_ok[None, :], EVEN_D, UPCAST)
        lse = tl.load(Lse + (b * H + h) * S_Q + start_m + offs_m)
        lse = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(Delta + (b * H + h) * S_Q + start_m + offs_m)
        if HAS_INDEX:
            k_head = K + b * stride_kb + h * stride_kh
            v_head = V + b * stride_vb + h * stride_vh
        else:
            kt_base = (K + b * stride_kb + h * stride_kh
                       + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd)
            vt_base = (V + b * stride_vb + h * stride_vh
                       + offs_n[None, :] * stride_vs + offs_d[:, None] * stride_vd)
        if IS_VARLEN:
            qseg = tl.load(QSeg + start_m + offs_m)

        # compressed rows: this query block's key-block ids are KVCols[row_start : row_end]
        row_ptr = KVPtr + b * stride_nb + h * stride_nh + qb
        row_start = tl.load(row_ptr)
        num_kv = (tl.load(row_ptr + 1) - row_start).to(tl.int32)
        idx_ptr = KVCols + row_start
        sub = BLOCK_SIZE // BLOCK_N

        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for it in range(0, num_kv * sub):
            kb = tl.load(idx_ptr + (it // sub)).to(tl.int32)
            start_n = kb * BLOCK_SIZE + (it % sub) * BLOCK_N
            if HAS_INDEX:
                k_rows = tl.load(TokIdx + start_n + offs_n)
                kt = _load_rows(k_head, k_rows, stride_ks, offs_d, stride_kd, False, d_ok, UPCAST)
                vt = _load_rows(v_head, k_rows, stride_vs, offs_d, stride_vd, False, d_ok, UPCAST)
            else:
                kt = _load(kt_base + start_n.to(tl.int64) * stride_ks, d_ok[:, None], EVEN_D, UPCAST)
                vt = _load(vt_base + start_n.to(tl.int64) * stride_vs, d_ok[:, None], EVEN_D, UPCAST)
            p = tl.math.exp2(tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale - lse[:, None])
            if HAS_TOKEN_VALID:
                tv = tl.load(TokValid + b * stride_tb + start_n + offs_n)
                p = tl.where(tv[None, :] != 0, p, 0.0)
            if IS_VARLEN:
                kseg = tl.load(KSeg + start_n + offs_n)
                p = tl.where(qseg[:, None] == kseg[None, :], p, 0.0)
            dp = tl.dot(do, vt, input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PREC)

        dq = dq * sm_scale
        if HAS_INDEX:
            _store_rows(DQ + b * stride_dqb + h * stride_dqh, q_rows, stride_dqs, offs_d, stride_dqd,
                        d_ok, dq)
        else:
            dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + row_m * stride_dqs + offs_d[None, :] * stride_dqd
            if EVEN_D:
                tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty))
            else:
                tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=d_ok[None, :])

    # ----------------------------------------------------------------------------------- autotune
    def _configs(shapes):
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in shapes
        ]

    def _prune(configs, named_args, **kwargs):
        """Keep tiles that divide the mask block; for wide heads, smaller pipelines and tiles (shared
        memory: at D = 256 the atomic dK/dV kernel needs 256 KB with 64-row query tiles)."""
        bs = kwargs.get("BLOCK_SIZE", named_args.get("BLOCK_SIZE"))
        d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        walk_max = 32 if kwargs.get("ATOMIC_DQ", named_args.get("ATOMIC_DQ", False)) else 128
        # the small tiles only serve masks of 16 or 32 tokens (they would only slow 64-token ones)
        kept = [
            c for c in configs
            if bs % c.kwargs["BLOCK_M"] == 0 and bs % c.kwargs["BLOCK_N"] == 0
            and (bs < 64 or max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) >= 64)
            and (d <= 128 or (c.num_stages <= 2 and c.kwargs["BLOCK_N"] <= 64
                              and c.kwargs["BLOCK_M"] <= walk_max))
        ]
        t = min(64, bs)
        return kept or [triton.Config({"BLOCK_M": t, "BLOCK_N": t}, num_warps=4, num_stages=1)]

    _KEY = ["D", "BLOCK_SIZE", "HAS_TOKEN_VALID", "IS_VARLEN", "HAS_INDEX"]
    _PRUNE = {"early_config_prune": _prune}
    # (BLOCK_M, BLOCK_N, warps, stages); tiles that do not divide block_size are pruned, so 64-token
    # masks tune 4 or 5 configs per kernel. Forward: BLOCK_M = owned query tile, BLOCK_N = walked key tile.
    # The 4-stage entries (64-token masks) follow the first H200 run, where 3 stages beat 2 for nearly
    # every kernel with 4 warps (benchmarks/RESULTS.md); 8 warps were 1.6-2.8x slower there but stay for
    # D = 256, where only they fit without spilling.
    _FWD_CONFIGS = _configs([
        (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 8, 2), (64, 64, 8, 3), (64, 32, 4, 3),
        (128, 64, 8, 3), (128, 128, 8, 2), (32, 32, 4, 2), (16, 16, 4, 2),
    ])
    # dK/dV: BLOCK_N is the key tile the program owns, BLOCK_M the walked query tile.
    # With 4 warps the dK/dV kernels spill registers at D = 128 on sm_90 (the atomic one heavily); 32-row
    # query tiles with 8 warps are the one tile that neither spills nor overflows shared memory at D = 256.
    _DKDV_CONFIGS = _configs([
        (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 8, 2), (32, 64, 4, 3), (32, 64, 4, 4),
        (32, 64, 8, 2), (64, 128, 8, 2), (32, 32, 4, 2), (16, 16, 4, 2),
    ])
    _DQ_CONFIGS = _configs([
        (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 8, 2), (64, 32, 4, 3), (128, 64, 8, 2),
        (32, 32, 4, 2), (16, 16, 4, 2),
    ])
    _fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)(_bsa_fwd_kernel)
    _dkdv_tuned = triton.autotune(_DKDV_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)(_bsa_bwd_dkdv_kernel)
    # Its own tuner (own cache) for the atomic scheme; DQA is zeroed before every trial of a config.
    _dkdv_atomic_tuned = triton.autotune(_DKDV_CONFIGS, key=_KEY, prune_configs_by=_PRUNE,
                                         reset_to_zero=["DQA"])(_bsa_bwd_dkdv_kernel)
    _dq_tuned = triton.autotune(_DQ_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)(_bsa_bwd_dq_kernel)


# ---------------------------------------------------------------------------------------- launchers
def fixed_config(kernel: str, block_d: int, block_size: int = 64) -> dict:
    """The config launched without autotuning (``KANDINSKY_BSA_AUTOTUNE=0``; tiles only under the
    interpreter): ``kernel`` one of fwd / dkdv / dq / dkdv-atomic, ``block_d`` the head dim rounded up to a
    power of two. The tiles own 64 rows (the grid): BLOCK_M for fwd / dq, BLOCK_N for dK/dV; masks of 16
    or 32 tokens clamp both tiles to the block.

    Up to D = 128: the autotuner's pick on an H200 (Triton 3.6, bf16, S = 93,696, 10 % density;
    benchmarks/RESULTS.md), all with 4 warps. 8 warps took 1.6-2.8x as long for every kernel and head dim
    there, although with 4 the dK/dV kernels spill a few registers at D = 128 (the earlier fixed configs
    used 8 to avoid that, from compiles alone). At D = 128 the dK/dV walk takes 32-row query tiles
    (dkdv 60 ms against 65-80 ms for 64-row ones, the atomic one 148 against 198-235) and dQ 2 stages.
    D = 256 (not measured on a GPU yet): 8 warps, 2 stages and 32-row query tiles in the dK/dV walk,
    chosen from sm_90 compiles so that nothing overflows shared memory (the atomic one needs 256 KB with
    64-row tiles)."""
    if block_d <= 64:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    elif block_d <= 128:
        walk = 32 if kernel.startswith("dkdv") else 64
        cfg = {"BLOCK_M": walk, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2 if kernel == "dq" else 3}
    else:
        walk = 32 if kernel.startswith("dkdv") else 64
        cfg = {"BLOCK_M": walk, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    cfg["BLOCK_M"], cfg["BLOCK_N"] = min(cfg["BLOCK_M"], block_size), min(cfg["BLOCK_N"], block_size)
    return cfg


def _launch(tuned, plain, rows, bh, args, meta, kernel):
    """Autotuned launch on the GPU; :func:`fixed_config` under the interpreter (or autotune off).

    ``kernel`` names it for fixed_config; dK/dV programs own BLOCK_N key rows, the others BLOCK_M query
    rows.
    """
    tile = "BLOCK_N" if kernel.startswith("dkdv") else "BLOCK_M"
    if _AUTOTUNE and not INTERPRET:
        tuned[lambda m: (rows // m[tile], bh)](*args, **meta)
    else:
        cfg = fixed_config(kernel, meta["BLOCK_D"], meta["BLOCK_SIZE"])
        owned = cfg[tile]
        if INTERPRET:  # warps and stages mean nothing there
            cfg = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]}
        plain[(rows // owned, bh)](*args, **meta, **cfg)


def _mask_strides(ptr: torch.Tensor, cols: torch.Tensor, b: int, h: int, rows: int) -> tuple[int, ...]:
    """(B, H) strides of the (Bm, Hm, rows + 1) row pointers expanded to (B, H, ...): 0 = broadcast."""
    if ptr.dim() != 3 or ptr.shape[2] != rows + 1 or not ptr.is_contiguous() or cols.dim() != 1:
        raise ValueError(f"mask row pointers {tuple(ptr.shape)} / ids {tuple(cols.shape)} must be contiguous "
                         f"(Bm, Hm, {rows + 1}) / (nnz,)")
    if ptr.dtype != torch.int64 or cols.dtype not in (torch.int16, torch.int32):
        raise ValueError(f"mask tensors must be int64 / int16 or int32, got {ptr.dtype} / {cols.dtype}")
    if ptr.shape[0] not in (1, b) or ptr.shape[1] not in (1, h):
        raise ValueError(f"mask batch/head dims {tuple(ptr.shape[:2])} must be 1 or ({b}, {h})")
    return ptr.expand(b, h, -1).stride()[:2]


def check_token_index_arg(token_index: torch.Tensor, rows: int, block_size: int, device) -> None:
    """Validate ``token_index`` (see the module doc of the launchers): int64 (Sf,) on ``device``, Sf a
    multiple of ``block_size``, values in [-1, rows), every row 0..rows-1 exactly once (the value check
    is :func:`kandinsky_kernels._validation.check_token_index`: one host sync the first time, then
    cached on the tensor while it is unchanged). Raises ValueError naming token_index."""
    is_tensor = isinstance(token_index, torch.Tensor)
    if not is_tensor or token_index.dtype != torch.int64 or token_index.dim() != 1:
        what = (f"{token_index.dtype} of shape {tuple(token_index.shape)}" if is_tensor
                else type(token_index).__name__)
        raise ValueError(f"token_index must be a 1-D int64 tensor (Sf,), got {what}")
    if token_index.device != torch.device(device):
        raise ValueError(f"token_index on {token_index.device} but q on {device}")
    sf = token_index.numel()
    if sf % block_size:
        raise ValueError(f"token_index has {sf} positions, not a multiple of block_size={block_size}")
    if sf < rows:
        raise ValueError(f"token_index has {sf} positions, fewer than the {rows} rows of q it must cover")
    check_token_index(token_index, rows)


def _common(q, k, v, kv_ptr, block_size, token_valid, cu_seqlens, token_index=None):
    """Validate the shared arguments; return launch facts and the (token_valid, qseg, kseg, index)
    tensors. With ``token_index`` the sequence lengths returned are positions (Sf), and -1 positions are
    AND-ed into token_valid as pad keys."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not importable")
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be (B, S, H, D)")
    b, s_q, h, d = q.shape
    s_k = k.shape[1]
    if token_index is not None:
        if s_k != s_q:
            raise ValueError(f"token_index needs self-attention (k.size(1) == q.size(1)), got q "
                             f"{tuple(q.shape)}, k {tuple(k.shape)}")
        # (a block_size outside the supported ones is named by the check below)
        bs_ok = block_size if block_size in _BLOCK_SIZES else 1
        check_token_index_arg(token_index, s_q, bs_ok, q.device)
        token_index = token_index.contiguous()
        s_q = s_k = token_index.numel()  # from here on: positions
    if k.shape[0] != b or k.shape[2] != h or k.shape[3] != d:
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in B, H or D")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if d % 16 != 0 or d > 256:
        raise ValueError(f"head dim {d} must be a multiple of 16 and at most 256")
    if block_size not in _BLOCK_SIZES:
        raise ValueError(f"block_size {block_size} must be one of {_BLOCK_SIZES}")
    if s_q % block_size or s_k % block_size or kv_ptr.dim() != 3 or kv_ptr.shape[2] != s_q // block_size + 1:
        raise ValueError(f"sequence lengths ({s_q}, {s_k}) must be whole blocks of {block_size}, with mask "
                         f"row pointers (Bm, Hm, Sq / block_size + 1), got {tuple(kv_ptr.shape)}")
    dev = q.device
    if dev.type == "cpu" and not INTERPRET:
        raise RuntimeError("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    for name, t in (("k", k), ("v", v), ("the mask", kv_ptr)):
        if t.device != dev:
            raise ValueError(f"{name} on {t.device} but q on {dev}")

    tv = None
    if token_valid is not None:
        if token_valid.dtype != torch.bool or token_valid.dim() not in (1, 2) or token_valid.shape[-1] != s_k:
            raise ValueError(f"token_valid must be bool (S,) or (B, S) with S={s_k}, got "
                             f"{token_valid.dtype} {tuple(token_valid.shape)}")
        tv = token_valid.reshape(-1, s_k)
        if tv.shape[0] not in (1, b):
            raise ValueError(f"token_valid batch {tv.shape[0]} must be 1 or {b}")
        tv = tv.to(dev)
    # Padding positions are pad keys whatever token_valid says. A valid index names each of the rows
    # once, so it holds Sf - rows of them: known without reading it.
    if token_index is not None and token_index.numel() > q.shape[1]:
        real = (token_index >= 0).unsqueeze(0)
        tv = real if tv is None else tv & real
    if tv is not None:
        tv = tv.contiguous().view(torch.uint8)
    qseg = kseg = None
    if cu_seqlens is not None:
        # (n+1,): queries and keys packed alike (Sq == Sk); (2, n+1): query offsets, key offsets
        pair = cu_seqlens.dim() == 2
        if b != 1 or (not pair and s_q != s_k):
            raise ValueError(f"cu_seqlens needs B == 1 (and Sq == Sk unless given per side), got q "
                             f"{tuple(q.shape)}, k {tuple(k.shape)}")
        cus = (cu_seqlens[0], cu_seqlens[1]) if pair else (cu_seqlens, cu_seqlens)

        def _seg(cu, n, outside):
            # Tokens outside every segment get ids that match nothing: -1 as queries, -2 as keys.
            cu = cu.to(dev, torch.int64)
            pos = torch.arange(n, device=dev)
            seg = torch.searchsorted(cu[1:].contiguous(), pos, right=True).to(torch.int32)
            return torch.where((pos >= cu[0]) & (pos < cu[-1]), seg, outside).to(torch.int32)

        qseg, kseg = _seg(cus[0], s_q, -1), _seg(cus[1], s_k, -2)
        if tv is not None:  # B == 1: fold padding into the key ids, one per-element check instead of two
            kseg = torch.where(tv[0] != 0, kseg, -2).to(torch.int32)
            tv = None
    upcast = dev.type == "cpu"
    meta = dict(
        D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), EVEN_D=triton.next_power_of_2(d) == d,
        BLOCK_SIZE=block_size, HAS_TOKEN_VALID=tv is not None, IS_VARLEN=qseg is not None,
        HAS_INDEX=token_index is not None,
        UPCAST=upcast, DOT_PREC="ieee" if (upcast or q.dtype == torch.float32) else "tf32",
    )
    dummy = kv_ptr  # never read when the matching flag is off
    tensors = (
        tv if tv is not None else dummy,
        qseg if qseg is not None else dummy,
        kseg if kseg is not None else dummy,
        token_index if token_index is not None else dummy,
    )
    stride_tb = 0 if tv is None or tv.shape[0] == 1 else tv.stride(0)
    return (b, s_q, s_k, h, d), meta, tensors, stride_tb


def _scale(scale, d):
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


def bsa_forward_triton(q, k, v, kv_ptr, kv_cols, block_size, scale, token_valid, cu_seqlens,
                       token_index=None):
    """Block-sparse attention forward. q, k, v: (B, S, H, D), any strides, fp32/fp16/bf16.

    The mask in compressed rows (:class:`kandinsky_kernels.BlockSparseMask`): ``kv_ptr`` int64
    (Bm, Hm, Nq + 1), ``kv_cols`` int16 / int32 (nnz,), with Bm in {1, B}, Hm in {1, H}; ``token_valid`` bool (S,) / (B or 1, S) marks real keys; ``cu_seqlens`` int32 (n+1,)
    packs segments along S (B == 1). Returns ``out`` (B, S, H, D) in q.dtype and ``lse`` fp32 (B, H, S):
    the natural-log logsumexp of the scaled logits, -inf (with out = 0) for rows that see no key.

    ``token_index`` int64 (Sf,) or None: position p of the sequence reads raster row ``token_index[p]`` of
    q, k, v and writes it in ``out`` (-1: a padding position, zeros in, a pad key, written nowhere; every
    row exactly once). Then q, k, v, out are (B, Sr, H, D) raster tensors and everything else (mask,
    token_valid, cu_seqlens, lse (B, H, Sf)) is in positions.
    """
    (b, s_q, s_k, h, d), meta, (tv, qseg, kseg, idx), stride_tb = _common(
        q, k, v, kv_ptr, block_size, token_valid, cu_seqlens, token_index)
    out = torch.empty(q.shape if token_index is not None else (b, s_q, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, s_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or lse.numel() == 0:
        return out, lse.fill_(float("-inf"))
    args = (
        q, k, v, out, lse, kv_ptr, kv_cols, tv, qseg, kseg, idx,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *_mask_strides(kv_ptr, kv_cols, b, h, s_q // block_size), stride_tb,
        h, s_q, _scale(scale, d) * _LOG2E,
    )
    _launch(_fwd_tuned, _bsa_fwd_kernel, s_q, b * h, args, meta, "fwd")
    return out, lse


_BWD_SCHEMES = ("two_pass", "atomic")


def triton_backward_scheme(scheme: Optional[str] = None) -> str:
    """The Triton backward scheme: ``scheme`` if given, else ``KANDINSKY_BSA_TRITON_BWD``, else
    ``"two_pass"``.

    ``two_pass``: a dK/dV kernel walks each key tile's query tiles, a dQ kernel each query tile's key
    tiles (7 tile products per active tile pair, deterministic, no atomics; FlexAttention's scheme).
    ``atomic``: one kernel computes dK/dV and adds dQ into an fp32 buffer with atomics (5 products, as
    FlashAttention-2; dQ summation order, hence its last bits, varies from run to run).
    """
    if scheme is None:
        scheme = os.environ.get("KANDINSKY_BSA_TRITON_BWD", "two_pass")
    if scheme not in _BWD_SCHEMES:
        raise ValueError(f"Triton backward scheme {scheme!r} (KANDINSKY_BSA_TRITON_BWD) must be one of "
                         f"{_BWD_SCHEMES}")
    return scheme


def bsa_backward_triton(do, q, k, v, out, lse, kv_ptr, kv_cols, q_ptr, q_cols,
                        block_size, scale, token_valid, cu_seqlens, scheme=None, dlse=None, token_index=None):
    """Gradients (dq, dk, dv) of :func:`bsa_forward_triton`, each (B, S, H, D) in q.dtype.

    ``q_ptr`` int64 (Bm, Hm, Nk + 1) / ``q_cols`` (nnz,): the transposed mask in compressed rows
    (``BlockSparseMask.transpose_csr()``), walked by the dK/dV kernel. ``out`` and ``lse`` come from the
    forward. Rows with lse = -inf contribute nothing. ``scheme``: see :func:`triton_backward_scheme`.
    ``dlse`` (B, H, S) fp32 or None: the gradient of lse, folded into Delta (dS = P * (dP - (Delta -
    dlse))), so the kernels are unchanged. ``token_index``: as in :func:`bsa_forward_triton` (do, out, dq,
    dk, dv raster; lse and dlse (B, H, Sf)); the gradients of rows are written exactly once.
    """
    scheme = triton_backward_scheme(scheme)
    (b, s_q, s_k, h, d), meta, (tv, qseg, kseg, idx), stride_tb = _common(
        q, k, v, kv_ptr, block_size, token_valid, cu_seqlens, token_index)
    rows_q, rows_k = q.shape[1], k.shape[1]  # raster rows (== s_q, s_k without an index)
    if do.shape != q.shape or out.shape != q.shape or lse.shape != (b, h, s_q):
        raise ValueError(f"do {tuple(do.shape)} / out {tuple(out.shape)} must be {tuple(q.shape)} and lse "
                         f"{tuple(lse.shape)} must be {(b, h, s_q)}")
    if q_ptr.shape != (*kv_ptr.shape[:2], s_k // block_size + 1) or q_cols.numel() != kv_cols.numel():
        raise ValueError(f"q_ptr {tuple(q_ptr.shape)} / q_cols {tuple(q_cols.shape)} is not the transpose of "
                         f"kv_ptr {tuple(kv_ptr.shape)} / kv_cols {tuple(kv_cols.shape)}")
    lse = lse.contiguous().float()
    atomic = scheme == "atomic"
    # atomic: dQ accumulates in fp32, (B, S, H, D) so that the final cast is one contiguous copy
    dq = (torch.zeros if atomic else torch.empty)(
        (b, rows_q, h, d), dtype=torch.float32 if atomic else q.dtype, device=q.device)
    dk = torch.empty((b, rows_k, h, d), dtype=k.dtype, device=q.device)
    dv = torch.empty((b, rows_k, h, d), dtype=v.dtype, device=q.device)
    if dq.numel() == 0 or dk.numel() == 0 or lse.numel() == 0:
        return dq.to(q.dtype).zero_(), dk.zero_(), dv.zero_()
    sm_scale = _scale(scale, d)
    delta = torch.empty_like(lse)
    pre_m = min(64, meta["BLOCK_SIZE"])  # divides Sq (a multiple of the block)
    _bsa_bwd_preprocess_kernel[(s_q // pre_m, b * h)](
        out, do, delta, idx, *out.stride(), *do.stride(), h, s_q,
        D=d, BLOCK_D=meta["BLOCK_D"], EVEN_D=meta["EVEN_D"], BLOCK_M=pre_m, HAS_INDEX=meta["HAS_INDEX"],
    )
    if dlse is not None:
        delta -= dlse
    common_tail = (stride_tb, h, s_q, sm_scale * _LOG2E, sm_scale)
    dkdv_args = (
        q, k, v, do, dk, dv, dq if atomic else dk, lse, delta, q_ptr, q_cols, tv, qseg, kseg, idx,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        *(dq.stride() if atomic else (0, 0, 0, 0)),
        *_mask_strides(q_ptr, q_cols, b, h, s_k // block_size), *common_tail,
    )
    _launch(_dkdv_atomic_tuned if atomic else _dkdv_tuned, _bsa_bwd_dkdv_kernel, s_k, b * h, dkdv_args,
            {**meta, "ATOMIC_DQ": atomic}, "dkdv-atomic" if atomic else "dkdv")
    if atomic:
        return dq.to(q.dtype), dk, dv
    dq_args = (
        q, k, v, do, dq, lse, delta, kv_ptr, kv_cols, tv, qseg, kseg, idx,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        *_mask_strides(kv_ptr, kv_cols, b, h, s_q // block_size), *common_tail,
    )
    _launch(_dq_tuned, _bsa_bwd_dq_kernel, s_q, b * h, dq_args, meta, "dq")
    return dq, dk, dv
