"""Triton helpers shared by the fused matrix kernels (:mod:`.fused`, :mod:`.fused_bwd`): which
tokens a chunk program reads, which chunks a sequence program walks, and the chunk's decay.

Layouts: tokens are flat ``[B·T]`` (token-major inputs ``[B·T, H, D]``); chunk ``c`` covers
tokens ``[tok_start[c], tok_stop[c])``; sequence ``n`` owns chunks
``[chunk_offsets[n], chunk_offsets[n + 1])``.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def chunk_tokens(tok_start, tok_stop, c, C: tl.constexpr):
    """The C token slots of chunk ``c``: ``(offs_c [C], valid [C], tok [C] int64)``; slots past
    the chunk's end are ``valid == False`` (loads masked to 0, stores skipped)."""
    t0 = tl.load(tok_start + c).to(tl.int64)
    t1 = tl.load(tok_stop + c).to(tl.int64)
    offs_c = tl.arange(0, C)
    return offs_c, offs_c < (t1 - t0), t0 + offs_c


@triton.jit
def sequence_program(chunk_offsets, H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr):
    """For a grid ``(cdiv(V, BV), N·H, cdiv(K, BK))`` walking one sequence × head × value block ×
    key block: its ``(i_nh, i_h, c_start, c_end, offs_k, mask_k, offs_v, mask_v)``."""
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // H
    c_start = tl.load(chunk_offsets + i_n)
    c_end = tl.load(chunk_offsets + i_n + 1)
    offs_k = tl.program_id(2) * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    return i_nh, i_nh % H, c_start, c_end, offs_k, offs_k < K, offs_v, offs_v < V


@triton.jit
def walk_program(chunk_offsets, H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 SEG_L: tl.constexpr, SEG_W: tl.constexpr = 0, SEG_EXT: tl.constexpr = False):
    """The program of a sequential pass: :func:`sequence_program`'s outputs, then ``(mask_kv,
    kv, kvs, j, lead)``: the [BK, BV] tile's mask and offsets in a ``[.., K, V]`` state, its
    offsets in a segment row of seg_end ``[.., K, SEG_W]``, and with SEG_L > 0 (a grid
    ``(segments · cdiv(columns, BV), N·H, cdiv(K, BK))``, :mod:`.split`) the segment j it walks
    (chunks ``[j·SEG_L, (j + 1)·SEG_L)`` of its sequence, which is the chunk range returned) and
    its value block ``[1]`` int32 (the first writes the segment's log-decay);
    SEG_L = 0: the whole sequence (j = 0). The columns are V, or with SEG_EXT V + K: the last K
    are the columns of the segment's transition, walked from the identity (:mod:`.split`)."""
    i_nh, i_h, c_start, c_end, offs_k, mask_k, offs_v, mask_v = sequence_program(chunk_offsets, H, K, V, BK, BV)
    j = 0
    lead = tl.zeros([1], dtype=tl.int32)
    kvs = offs_k[:, None] * V + offs_v[None, :]
    if SEG_L > 0:
        NCOL: tl.constexpr = V + K * SEG_EXT
        NV: tl.constexpr = (NCOL + BV - 1) // BV
        i_v = tl.program_id(0) % NV
        j = tl.program_id(0) // NV
        offs_v = i_v * BV + tl.arange(0, BV)
        mask_v = offs_v < NCOL
        c_start = c_start + j * SEG_L
        c_end = tl.minimum(c_start + SEG_L, c_end)
        lead += i_v
        kvs = offs_k[:, None] * SEG_W + offs_v[None, :]
    return (i_nh, i_h, c_start, c_end, offs_k, mask_k, offs_v, mask_v, mask_k[:, None] & mask_v[None, :],
            offs_k[:, None] * V + offs_v[None, :], kvs, j, lead)


@triton.jit
def walk_bounds(tok_start, tok_stop, c_start, c_end):
    """The first and one-past-last token of a walk over chunks ``[c_start, c_end)`` (one
    sequence, or a segment of it), int64; loaded once, before the walk (0, 0 for no chunks)."""
    some = c_end > c_start
    t_first = tl.load(tok_start + c_start, mask=some, other=0).to(tl.int64)
    t_end = tl.load(tok_stop + tl.maximum(c_end - 1, 0), mask=some, other=0).to(tl.int64)
    return t_first, t_end


@triton.jit
def walk_tokens(t_first, t_end, c, c_start, C: tl.constexpr):
    """:func:`chunk_tokens` of chunk ``c`` of a walk (:func:`walk_bounds`), from arithmetic on
    ``c``: a sequence's chunks are its consecutive C-token pieces (the last one shorter), so no
    per-chunk index load sits between the loop counter and the chunk's addresses, and the
    compiler can issue the loads of later chunks early (``num_stages``). Returns
    ``(offs_c, valid, tok, last)``, ``last`` the chunk's last token."""
    t0 = t_first + (c - c_start).to(tl.int64) * C
    offs_c = tl.arange(0, C)
    return offs_c, offs_c < (t_end - t0), t0 + offs_c, tl.minimum(t0 + C, t_end) - 1


@triton.jit
def segment_start(seg_end, i_nh, NSEG, j, kvs, mask_kv, offs_k, offs_v, K: tl.constexpr, V: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, SEG_W: tl.constexpr, SEG_START: tl.constexpr,
                  SEG_EXT: tl.constexpr):
    """The state a segment walk starts from, ``[BK, BV]`` fp32: with SEG_START its true start,
    which the join left in seg_end ``[N·H, NSEG, K, SEG_W]``; with SEG_EXT the identity in the
    transition's columns ``[V, V + K)`` (zeros in the others); else zeros."""
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if SEG_START:
        S += tl.load(seg_end + (i_nh.to(tl.int64) * NSEG + j) * K * SEG_W + kvs, mask=mask_kv, other=0.)
    if SEG_EXT:
        S += tl.where(offs_k[:, None] == offs_v[None, :] - V, 1., 0.)
    return S


@triton.jit
def store_segment_end(seg_end, seg_g, i_nh, NSEG, j, S, cum, kvs, mask_kv, lead, offs_k, mask_k,
                      K: tl.constexpr, SEG_W: tl.constexpr, GK: tl.constexpr):
    """A segment walk's result: its end state ``S`` (with the transition's columns, if walked)
    into seg_end ``[N·H, NSEG, K, SEG_W]`` and, from the first value block, its total log-decay
    ``cum`` into seg_g: ``[N·H, NSEG]`` for a scalar decay (GK = 1), ``[N·H, NSEG, K]`` per key
    (GK = 2; each key block its keys); GK = 0 stores none (no decay, or the transition walked)."""
    slot = i_nh.to(tl.int64) * NSEG + j
    tl.store(seg_end + slot * K * SEG_W + kvs, S, mask=mask_kv)
    if GK == 1:
        tl.store(seg_g + slot + tl.arange(0, 1), cum, mask=(lead + tl.program_id(2)) == 0)
    elif GK == 2:
        tl.store(seg_g + slot * K + offs_k, cum, mask=mask_k & (lead == 0))


#: lower bound put on every log-decay step before it is summed: e^{−100} is already below
#: float32's normal range (so no result moves), and a log-decay of −inf (a full reset) then gives
#: G_t − G_s = −100 instead of −inf − (−inf) = NaN. NaN itself stays NaN (``where``, not ``maximum``).
LOG_DECAY_FLOOR = tl.constexpr(-100.0)


@triton.jit
def floor_log_decay(x):
    """``x`` with entries below :data:`LOG_DECAY_FLOOR` raised to it (NaN kept)."""
    return tl.where(x < LOG_DECAY_FLOOR, LOG_DECAY_FLOOR, x)


@triton.jit
def chunk_decay(g, tok, valid, i_h, H, offs_c):
    """Scalar log-decay of one chunk × head: ``(g_c [C], G [C], total)``, G the inclusive
    cumulative sum within the chunk (chunk-relative, so it never grows past one chunk); fp32,
    each step floored at :data:`LOG_DECAY_FLOOR`. G (``tl.cumsum``) and the total (``tl.sum``) add
    in different orders, so G at the chunk's last token may differ from the total by a few ulps."""
    g_c = floor_log_decay(tl.load(g + tok * H + i_h, mask=valid, other=0.))
    G = tl.cumsum(g_c, axis=0)
    return g_c, G, tl.sum(g_c, axis=0)


@triton.jit
def walk_decay(g, tok, valid, last, i_h, H, offs_c, G_CUM: tl.constexpr):
    """A walk's scalar log-decay of one chunk × head: ``(G [C], total)`` as :func:`chunk_decay`'s.
    With G_CUM, g already holds G (:func:`.perkey.chunk_cumsum` of the log-decay, ``[B·T, H]``
    fp32), so the walk loads G and reads the total at the chunk's last token instead of a
    ``tl.cumsum`` and a ``tl.sum`` across its warps on the sequential path; past the chunk's end G
    is the total, as the cumulative sum of zeros there gives (so ``e^{G_t − G_s}`` stays finite)."""
    if G_CUM:
        total = tl.load(g + last * H + i_h)
        G = tl.where(valid, tl.load(g + tok * H + i_h, mask=valid, other=0.), total)
    else:
        _, G, total = chunk_decay(g, tok, valid, i_h, H, offs_c)
    return G, total


@triton.jit
def chunk_key_tiles(tok_start, tok_stop, nh, H, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, k0):
    """Keys ``[k0, k0 + BK)`` of chunk × head ``nh`` (= chunk · H + head): returns
    ``(i_h, offs_c, valid, tok, offs_k, mask_k, row_k, mask_row, col_k, mask_col)`` with ``row_k``
    the token-major ``[C, BK]`` offsets and ``col_k`` the same transposed, ``[BK, C]`` (to load an
    operand transposed instead of ``tl.trans``); what a kernel leaves unused is compiled away."""
    i_h = nh % H
    offs_c, valid, tok = chunk_tokens(tok_start, tok_stop, nh // H, C)
    offs_k = k0 + tl.arange(0, BK)
    mask_k = offs_k < K
    row_k = (tok[:, None] * H + i_h) * K + offs_k[None, :]
    col_k = (tok[None, :] * H + i_h) * K + offs_k[:, None]
    return (i_h, offs_c, valid, tok, offs_k, mask_k, row_k, valid[:, None] & mask_k[None, :], col_k,
            mask_k[:, None] & valid[None, :])


@triton.jit
def kslice_program(tok_start, tok_stop, H, K: tl.constexpr, C: tl.constexpr, BKS: tl.constexpr):
    """For a grid ``(cdiv(K, BKS), NC·H)`` over key slices × chunks × heads: its
    ``(nh, i_h, offs_c, valid, tok, i_k, offs_k, mask_k, row_k, mask_row)`` (see
    :func:`chunk_key_tiles`)."""
    i_k = tl.program_id(0)
    nh = tl.program_id(1).to(tl.int64)
    i_h, offs_c, valid, tok, offs_k, mask_k, row_k, mask_row, _, _ = chunk_key_tiles(tok_start, tok_stop, nh, H, K,
                                                                                     C, BKS, i_k * BKS)
    return nh, i_h, offs_c, valid, tok, i_k, offs_k, mask_k, row_k, mask_row


@triton.jit
def chunk_gamma(gc, tok_stop, c, i_h, H, K: tl.constexpr, offs_k, mask_k):
    """Per-key decay of chunk ``c`` (head i_h) over all its tokens, γ ``[BK]`` fp32: the last row
    of the chunk-relative cumulative log-decay gc ``[B·T, H, K]`` (:mod:`.perkey`)."""
    return gamma_at(gc, tl.load(tok_stop + c).to(tl.int64) - 1, i_h, H, K, offs_k, mask_k)


@triton.jit
def gamma_at(gc, last, i_h, H, K: tl.constexpr, offs_k, mask_k):
    """:func:`chunk_gamma` of the chunk whose last token is ``last``."""
    return tl.load(gc + (last * H + i_h) * K + offs_k, mask=mask_k, other=0.)


@triton.jit
def bf16_dot_probe(a, b, out, N: tl.constexpr):
    """``out = a @ b`` for one ``[N, N]`` pair loaded in their dtype: the probe of
    :func:`.chunk.interpreter_bf16_dots_ok`."""
    r = tl.arange(0, N)
    tile = r[:, None] * N + r[None, :]
    tl.store(out + tile, tl.dot(tl.load(a + tile), tl.load(b + tile)))
