"""The backward split's fold: each segment's starting gradient from the carry pass's pairs.

The backward split along the sequence (:func:`~.scan.backward_segments`) cuts a sequence into
NSPLIT segments. ``bwd_carry_kernel`` gives every segment s >= 1 a pair (A_s, L_s): the product
of its gates and the gradient its own outputs send to the state before it. The gradient
reaching the end of segment s - 1 is then dht carried back through segments NSPLIT - 1 .. s::

    P ← dht (or 0);  for s = NSPLIT - 1 .. 1:  P ← A_s ⊙ P + L_s;  start of segment s - 1 = P

This kernel runs that loop once per (sequence, head, value slice) and writes each P over L_s
(carry slot s - 1), so the backward reads one tile per segment instead of folding all later
pairs itself, and the caller can free the A buffer before the backward's gradients are
allocated: the pairs' memory at the backward's peak halves (0.56 MiB for mamba1 at E = 1536,
B = 2 and four segments). Recurrence-independent: one hand-written kernel serves every
generated one.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def fold_carries_kernel(
    carry_a, carry_l, dht, NSPLIT,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DHT: tl.constexpr,
):
    """One (sequence · head, value slice) program.

    Args:
        carry_a: ``[N·H, NV, NSPLIT - 1, BK, BV]`` float32, slot s - 1 holding A_s (read).
        carry_l: the same shape, slot s - 1 holding L_s; overwritten with the gradient
            reaching the end of segment s - 1.
        dht: ``[N, H, K, V]`` gradient of the final state (read when HAS_DHT).
        NSPLIT: segments per sequence.
    """
    i_bh = tl.program_id(0)
    i_v = tl.program_id(1)
    n_k = tl.arange(0, BK)
    j_v = i_v * BV + tl.arange(0, BV)
    P = tl.full([BK, BV], 0.0, dtype=tl.float32)
    if HAS_DHT:
        m_kv = (n_k < K)[:, None] & (j_v < V)[None, :]
        o_state = n_k[:, None] * V + j_v[None, :]
        P = tl.load(dht + i_bh.to(tl.int64) * K * V + o_state, mask=m_kv, other=0.0).to(tl.float32)
    o_prog = (i_bh * tl.num_programs(1) + i_v).to(tl.int64) * (NSPLIT - 1) * BK * BV
    o_tile = n_k[:, None] * BV + tl.arange(0, BV)[None, :]
    for i_s in range(0, NSPLIT - 1):
        o_slot = o_prog + (NSPLIT - 2 - i_s) * BK * BV + o_tile  # segment NSPLIT - 1 - i_s
        P = tl.load(carry_a + o_slot) * P + tl.load(carry_l + o_slot)
        tl.store(carry_l + o_slot, P)
