r"""Chunked matrix-class recurrence on Triton: the public entry point and its autograd.

Per head (DESIGN §3, class 1)::

    S_t = (diag(exp(g_t)) + Σ_r a_{t,r} b_{t,r}ᵀ) S_{t-1} + w_t u_tᵀ,     o_t = scale · S_tᵀ q_t

Algorithm (chunk length C, per chunk and head; GLA arXiv 2312.06635 for the decays, the WY/UT
representation of DeltaNet arXiv 2406.06484 / Gated DeltaNet arXiv 2412.06464 for the low rank):

1. Preparation, all chunks in parallel (batched torch ops + the per-key Gram kernel of
   :mod:`.gram`). With G_t the chunk-relative cumulative log-decay (G_0 = 0) and the probes
   h_{t,r} = b_{t,r}ᵀ S_{t-1}, the transition becomes a diagonal recurrence with extra writes
   a_{t,r} h_{t,r}ᵀ. The probes solve a unit lower-triangular system in the (t, r) order::

       (I − L) H = B̂ S_0 + N U,     L[(t,r),(s,r')] = b_{t,r}ᵀ e^{G_{t-1} − G_s} a_{s,r'}  (s < t)
                                    N[(t,r), s]     = b_{t,r}ᵀ e^{G_{t-1} − G_s} w_s       (s < t)

   so H = X S_0 + Y with X = (I − L)⁻¹ B̂ and Y = (I − L)⁻¹ N U (one triangular solve of the
   [CR, CR] system per chunk). Everything else follows:
   Q' = Q̂ + M_qa X, O = M_qw U + M_qa Y (M_q· are inclusive decayed Grams;
   Q̂ = q e^{G_t}, Ŵ, Â = w, a scaled by e^{G_C − G_s}, B̂ = b e^{G_{t-1}}). Every exponent is ≤ 0.
2. State pass (Triton, sequential over chunks): S_{n+1} = Γ S_n + Âᵀ (X S_n + Y) + Ŵᵀ U.
3. Output pass (Triton, parallel): o = scale · (Q' S_n + O).

Fast path: with no or a scalar decay and at most one low-rank pair, or a per-key decay and no
pair (GLA, :mod:`.perkey`), K, V <= 128, the forward is :mod:`.fused` instead (the same
quantities, formed inside Triton kernels from the inputs in place; ``OLSM_MATRIX_PATH=general``
turns it off). The triangular solve of step 1 is an explicit
Triton inverse (:mod:`.trinv`; ``OLSM_MATRIX_SOLVE=torch`` restores the batched solve).

Backward: in the same cases it is Triton kernels (:mod:`.fused_bwd`; ``OLSM_MATRIX_BWD=autograd`` turns them off). Otherwise the chunk-boundary
states S_n of the forward are kept; the preparation is recomputed under autograd, the reverse
state pass (Triton) gives ∂L/∂S_n, and torch's autograd carries the rest back to the inputs
(through the per-key Gram kernel's own backward).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from triton.runtime.errors import OutOfResources

from olsm.errors import BackendError, InputError

from .fused import env_choice, fused_applies, fused_forward
from .fused_bwd import fused_backward, fused_backward_applies
from .gram import decayed_gram
from .state import _ChunkRecurrence
from .tiles import LOG_DECAY_FLOOR
from .trinv import unit_lower_inverse

MAX_DIM = 256
MIN_TRITON = (3, 0)
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def interpreter_bf16_dots_ok() -> bool:
    """Whether this Triton's CPU interpreter computes ``tl.dot`` on bfloat16 operands correctly:
    one 16 × 16 product, run once per process. Triton 3.9's gives values of order 1e10 (float32
    and float16 operands are right), so bfloat16 inputs are refused there instead of returning
    garbage."""
    from .tiles import bf16_dot_probe

    # small integers (exact in bf16 and in the product), not symmetric, and not bit patterns that
    # bf16 and fp16 share, so a transposed or misread operand shows too
    i = torch.arange(16.)
    a, b = (i[:, None] + 2 * i[None, :]) % 5 - 2, (3 * i[:, None] + i[None, :]) % 7 - 3
    out = torch.zeros(16, 16)
    try:
        bf16_dot_probe[(1,)](a.bfloat16(), b.bfloat16(), out, 16)
    except Exception:  # noqa: BLE001 - an interpreter that cannot run it cannot run the kernels either
        return False
    return bool(torch.equal(out, a @ b))


def _check_backend(device: torch.device, dtype: Optional[torch.dtype] = None) -> None:
    try:
        import triton
    except ImportError as err:  # pragma: no cover - triton is a dependency on Linux
        raise BackendError("the Triton backend needs the `triton` package: pip install triton") from err
    version = tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_TRITON:
        raise BackendError(
            f"Triton {triton.__version__} is too old for olsm's kernels; need >= "
            f"{'.'.join(map(str, MIN_TRITON))} (pip install -U triton)"
        )
    if device.type == "cuda":
        return
    if _interpreting():
        if device.type != "cpu":
            raise BackendError(f"TRITON_INTERPRET=1 runs kernels on CPU tensors, got {device}")
        if dtype == torch.bfloat16 and not interpreter_bf16_dots_ok():
            raise BackendError(
                f"Triton {triton.__version__}'s CPU interpreter (TRITON_INTERPRET=1) computes tl.dot on "
                "bfloat16 operands wrongly; pass float32 or float16 tensors on the CPU, use "
                "backend='torch', or run on a CUDA GPU")
        return
    raise BackendError(
        f"the Triton backend needs CUDA tensors (got {device.type}); use backend='torch' "
        "on this machine, or set TRITON_INTERPRET=1 to run the kernels slowly on CPU"
    )


def _check_inputs(q, w, u, log_decay, lowrank, initial_state, cu_seqlens, chunk_size):
    if q.dim() != 4:
        raise InputError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    V = u.shape[-1] if u.dim() == 4 else -1
    named = [("w", w), ("u", u)] + [(f"lowrank[{i}][{j}]", t)
                                    for i, pair in enumerate(lowrank) for j, t in enumerate(pair)]
    for name, t in [("q", q)] + named:
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise InputError(f"{name} has dtype {t.dtype}; the Triton kernels take float32, float16 or bfloat16")
        if t.dtype != q.dtype:
            raise InputError(f"{name} has dtype {t.dtype} but q has {q.dtype}: pass one dtype "
                             "(log_decay and initial_state may also be float32)")
        if t.device != q.device:
            raise InputError(f"{name} is on {t.device} but q is on {q.device}")
        want = (B, T, H, V) if name == "u" else (B, T, H, K)
        if tuple(t.shape) != want:
            raise InputError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if K > MAX_DIM or V > MAX_DIM:
        raise BackendError(f"the Triton kernels support K, V <= {MAX_DIM}; got K={K}, V={V}")
    if log_decay is not None:
        if log_decay.dtype not in _FLOATS + (torch.float64,):
            raise InputError(f"log_decay must be floating point, got {log_decay.dtype}")
        if tuple(log_decay.shape) not in ((B, T, H), (B, T, H, K)):
            raise InputError(f"log_decay must be [B, T, H] or [B, T, H, K] = {(B, T, H, K)}, "
                             f"got {tuple(log_decay.shape)}")
        if log_decay.device != q.device:
            raise InputError(f"log_decay is on {log_decay.device} but q is on {q.device}")
    if not isinstance(chunk_size, int) or chunk_size < 16 or chunk_size > 128 or chunk_size % 16:
        raise InputError(f"chunk_size must be a multiple of 16 in [16, 128], got {chunk_size}")
    N = B
    if cu_seqlens is not None:
        if B != 1:
            raise InputError(f"with cu_seqlens the sequences are packed into B == 1, got B={B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise InputError("cu_seqlens must be a 1-D tensor [N + 1] of boundaries")
        N = cu_seqlens.numel() - 1
    if initial_state is not None:
        if tuple(initial_state.shape) != (N, H, K, V):
            raise InputError(f"initial_state must be [{N}, {H}, {K}, {V}], got {tuple(initial_state.shape)}")
        if initial_state.device != q.device:
            raise InputError(f"initial_state is on {initial_state.device} but q is on {q.device}")


# ----------------------------------------------------------------------------------------------
# Chunk layout: tokens [B, T, H, D]  <->  chunks [NC, H, C, D]
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Layout:
    """Where each chunk's tokens come from. Chunks never straddle sequences; the tail of a
    sequence's last chunk is padding with q = w = u = a = b = 0 and log_decay = 0, i.e. the
    identity transition, which leaves the state unchanged."""

    B: int
    T: int
    C: int
    NC: int
    chunk_offsets: torch.Tensor              # [N + 1] int32: chunks of sequence i
    gather: Optional[torch.Tensor] = None    # varlen: [NC·C] token index (T = padding row)
    scatter: Optional[torch.Tensor] = None   # varlen: [T] position of each token in the chunks
    tok_start: Optional[torch.Tensor] = None  # [NC] int32: first token of chunk n in [B·T]
    tok_stop: Optional[torch.Tensor] = None   # [NC] int32: one past its last token
    max_chunks: int = 0                       # chunks of the longest sequence


def _layout(B, T, C, cu_seqlens, device) -> _Layout:
    """The chunk layout of a call; without ``cu_seqlens`` it depends only on (B, T, C, device)
    and is kept (:func:`_dense_layout`): its eight small tensor ops were a visible part of a
    call's launch overhead at B = 8, T = 2048, where the kernels themselves take ~2 ms."""
    if cu_seqlens is None:
        device = torch.device(device)
        if not _may_cache(device):
            return _dense_layout.__wrapped__(B, T, C, device)
        # made as normal tensors even under inference_mode: the general path's backward saves
        # chunk_offsets for autograd, which refuses inference tensors
        with torch.inference_mode(False):
            return _dense_layout(B, T, C, device)
    return _packed_layout(B, T, C, cu_seqlens, device)


def _may_cache(device: torch.device) -> bool:
    """Whether a layout made now may serve later calls: not under a fake-tensor mode (the tensors
    would be fakes) nor during CUDA graph capture (they would stay unwritten until replay)."""
    from torch._guards import detect_fake_mode

    if detect_fake_mode() is not None:
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


@functools.lru_cache(maxsize=64)
def _dense_layout(B, T, C, device) -> _Layout:
    """Equal-length sequences: chunk n is (sequence n // NT, position n % NT). The tensors are
    only read by the kernels, so one copy serves every call."""
    NT = -(-T // C)
    offsets = torch.arange(B + 1, dtype=torch.int32, device=device) * NT
    # chunk n = (sequence n // NT, position n % NT): flat tokens [b·T + j·C, min(.. + C, b·T + T))
    n = torch.arange(B * NT, dtype=torch.int32, device=device)
    seq_start = n // NT * T
    start = seq_start + n % NT * C
    stop = torch.minimum(start + C, seq_start + T)
    return _Layout(B, T, C, B * NT, offsets, tok_start=start, tok_stop=stop, max_chunks=NT)


def _packed_layout(B, T, C, cu_seqlens, device) -> _Layout:
    """Packed sequences (``cu_seqlens``): chunks per sequence, the padded gather and scatter."""
    bounds = [int(b) for b in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != T or any(b > e for b, e in zip(bounds[:-1], bounds[1:])):
        raise InputError(f"cu_seqlens must rise from 0 to T={T}, got {bounds}")
    gather, scatter, offsets, starts, stops = [], [], [0], [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        n = -(-(hi - lo) // C)
        start = len(gather)
        scatter.extend(range(start, start + hi - lo))
        gather.extend(list(range(lo, hi)) + [T] * (n * C - (hi - lo)))
        offsets.append(offsets[-1] + n)
        starts.extend(range(lo, hi, C))
        stops.extend(min(s + C, hi) for s in range(lo, hi, C))
    as_long = dict(dtype=torch.long, device=device)
    as_int = dict(dtype=torch.int32, device=device)
    return _Layout(B, T, C, offsets[-1], torch.tensor(offsets, **as_int),
                   torch.tensor(gather, **as_long), torch.tensor(scatter, **as_long),
                   torch.tensor(starts, **as_int), torch.tensor(stops, **as_int),
                   max_chunks=max((b - a for a, b in zip(offsets[:-1], offsets[1:])), default=0))


def _to_chunks(x: torch.Tensor, lay: _Layout) -> torch.Tensor:
    """[B, T, H(, D)] -> float32 [NC, H, C(, D)]."""
    x = x.float()
    tail = x.shape[3:]
    if lay.gather is None:
        pad = lay.NC // max(lay.B, 1) * lay.C - lay.T
        if pad:
            x = F.pad(x, (0, 0) * len(tail) + (0, 0, 0, pad))
        x = x.reshape(lay.NC, lay.C, *x.shape[2:])
    else:
        flat = torch.cat([x[0], x.new_zeros(1, *x.shape[2:])], dim=0)
        x = flat[lay.gather].reshape(lay.NC, lay.C, *x.shape[2:])
    return x.transpose(1, 2).contiguous()


def _from_chunks(o: torch.Tensor, lay: _Layout) -> torch.Tensor:
    """[NC, C, H, V] -> [B, T, H, V]."""
    H, V = o.shape[2:]
    if lay.gather is None:
        return o.reshape(lay.B, -1, H, V)[:, : lay.T]
    return o.reshape(-1, H, V)[lay.scatter].unsqueeze(0)


# ----------------------------------------------------------------------------------------------
# Preparation (parallel over chunks) and the full pipeline
# ----------------------------------------------------------------------------------------------

def _scaled(x, logf):
    """x ⊙ exp(logf), logf per key [.., C, K] or per position [.., C] (exponents are <= 0)."""
    if logf is None:
        return x
    return x * torch.exp(logf if logf.dim() == x.dim() else logf[..., None])


def _prepare(q, w, u, g, lowrank):
    """Per-chunk quantities of the chunked form (module docstring, step 1).

    Args:
        q, w: ``[NC, H, C, K]`` fp32; u: ``[NC, H, C, V]``; g: ``None``, ``[NC, H, C]`` or
            ``[NC, H, C, K]`` (log-decays); lowrank: list of ``(a, b)``, each ``[NC, H, C, K]``.

    Returns:
        ``gamma`` (None, ``[NC, H]`` or ``[NC, H, K]``), ``a_hat``/``x_wy`` (``[NC, H, CR, K]``
        or None), ``y_wy [NC, H, CR, V]`` or None, ``w_hat [NC, H, C, K]``,
        ``q_eff [NC, H, C, K]``, ``o_intra [NC, H, C, V]``.
    """
    NC, H, C, K = q.shape
    if g is None:
        G = G_prev = to_end = gamma = None
    else:
        G = g.cumsum(2)                       # chunk-relative: |G| never grows past one chunk
        G_prev = G - g
        G_last = G[:, :, -1:]
        to_end = G_last - G                   # log of the decay from s to the chunk's end, <= 0
        gamma = torch.exp(G_last.squeeze(2))
    q_hat = _scaled(q, G)
    w_hat = _scaled(w, to_end)
    m_qw = decayed_gram(q, w, G, G, strict=False)
    o_intra = m_qw @ u
    if not lowrank:
        return gamma, None, None, None, w_hat, q_hat, o_intra

    R = len(lowrank)
    A = torch.stack([a for a, _ in lowrank], dim=3)            # [NC, H, C, R, K]
    Bm = torch.stack([b for _, b in lowrank], dim=3)
    # L[(t, r), (s, r')]: probes of row (t, r) against writes (s, r'), s < t
    L = torch.stack([torch.stack([decayed_gram(b, a, G_prev, G, strict=True) for a, _ in lowrank], -1)
                     for _, b in lowrank], dim=3)               # [NC, H, C, R, C, R]
    L = L.reshape(NC, H, C * R, C * R)
    n_bw = torch.stack([decayed_gram(b, w, G_prev, G, strict=True) for _, b in lowrank], dim=3)
    n_bw = n_bw.reshape(NC, H, C * R, C)
    m_qa = torch.stack([decayed_gram(q, a, G, G, strict=False) for a, _ in lowrank], dim=-1)
    m_qa = m_qa.reshape(NC, H, C, C * R)                        # [t, (s, r)]
    exp_b = None if G_prev is None else (G_prev if G_prev.dim() == 4 else G_prev[..., None])
    exp_a = None if to_end is None else (to_end if to_end.dim() == 4 else to_end[..., None])
    b_hat = (Bm if exp_b is None else Bm * torch.exp(exp_b)[:, :, :, None]).reshape(NC, H, C * R, K)
    a_hat = (A if exp_a is None else A * torch.exp(exp_a)[:, :, :, None]).reshape(NC, H, C * R, K)
    # WY/UT form: T = (I − L)⁻¹ in Triton (forward substitution in registers, see .trinv), then
    # plain batched products; OLSM_MATRIX_SOLVE=torch restores the batched triangular solve
    if env_choice("OLSM_MATRIX_SOLVE", ("triton", "torch")) == "torch":
        eye = torch.eye(C * R, device=q.device, dtype=q.dtype)
        rhs = torch.cat([b_hat, n_bw @ u], dim=-1)
        sol = torch.linalg.solve_triangular(eye - L, rhs, upper=False, unitriangular=True)
        x_wy, y_wy = sol[..., :K], sol[..., K:]
    else:
        T_wy = unit_lower_inverse(L)
        x_wy, y_wy = T_wy @ b_hat, (T_wy @ n_bw) @ u
    q_eff = q_hat + m_qa @ x_wy
    o_intra = o_intra + m_qa @ y_wy
    return gamma, a_hat.contiguous(), x_wy.contiguous(), y_wy.contiguous(), w_hat, q_eff, o_intra


def _pipeline(q, w, u, log_decay, lowrank, h0, lay: _Layout, meta, replay=None):
    """Tokens in, (o [B, T, H, V], final [N, H, K, V], states [NC, H, K, V]) out."""
    qc, wc, uc = (_to_chunks(t, lay) for t in (q, w, u))
    # each step floored as the fused kernels do (tiles.LOG_DECAY_FLOOR: a −inf step, a full
    # reset, would give −inf − (−inf) = NaN in the cumulative sums); clamp keeps NaN
    gc = None if log_decay is None else _to_chunks(log_decay, lay).clamp(min=LOG_DECAY_FLOOR.value)
    lrc = [(_to_chunks(a, lay), _to_chunks(b, lay)) for a, b in lowrank]
    gamma, a_hat, x_wy, y_wy, w_hat, q_eff, o_intra = _prepare(qc, wc, uc, gc, lrc)
    h0 = None if h0 is None else h0.float().contiguous()
    o, final, states = _ChunkRecurrence.apply(
        gamma if gamma is None else gamma.contiguous(), a_hat, x_wy, y_wy, w_hat.contiguous(), uc,
        q_eff.contiguous(), o_intra.contiguous(), h0, lay.chunk_offsets, meta, replay,
    )
    return _from_chunks(o, lay), final, states


class ChunkMatrixFunction(torch.autograd.Function):
    """Autograd wrapper: the forward keeps only the chunk-boundary states; the backward
    recomputes the (parallel) preparation and replays the states instead of the sequential
    pass, then differentiates."""

    @staticmethod
    def forward(ctx, q, w, u, log_decay, h0, lay, meta, n_lowrank, *lowrank_flat):
        lowrank = [(lowrank_flat[2 * i], lowrank_flat[2 * i + 1]) for i in range(n_lowrank)]
        with torch.no_grad():
            result = None
            if fused_applies(log_decay, lowrank, q.shape[-1], u.shape[-1]):
                try:
                    result = fused_forward(q, w, u, log_decay, lowrank, h0, lay.tok_start,
                                           lay.tok_stop, lay.chunk_offsets, lay.C, meta, lay.max_chunks)
                except OutOfResources:
                    # shared memory / registers of this GPU too small for the fused tiles
                    result = None
            if result is None:
                result = _pipeline(q, w, u, log_decay, lowrank, h0, lay, meta)
            # the fused per-key forward also hands over what its backward reuses (its Grams; with a
            # pair T, X and P as well)
            o, final, states, *kept = result
        ctx.save_for_backward(q, w, u, log_decay, h0, states, final, *lowrank_flat, *kept)
        ctx.lay, ctx.meta, ctx.n_lowrank = lay, meta, n_lowrank
        ctx.set_materialize_grads(False)
        return o, final

    @staticmethod
    @once_differentiable      # a second derivative through the kernels is an error, not a silent zero
    def backward(ctx, d_o, d_final):
        q, w, u, log_decay, h0, states, final, *rest = ctx.saved_tensors
        lowrank_flat, kept = rest[:2 * ctx.n_lowrank], tuple(rest[2 * ctx.n_lowrank:])
        if fused_backward_applies(log_decay, lowrank_flat, q.shape[-1], u.shape[-1]):
            try:
                grads = fused_backward(q, w, u, log_decay, h0, states, final, d_o, d_final, ctx.lay,
                                       ctx.meta, ctx.needs_input_grad[:5], lowrank_flat, kept=kept)
                return (*grads[:5], None, None, None, *grads[5:])
            except OutOfResources:
                pass  # this GPU's shared memory is too small for the tiles: autograd path below
        leaves = [q, w, u, log_decay, h0, *lowrank_flat]
        leaves = [None if t is None else t.detach().requires_grad_(ctx.needs_input_grad[i] if i < 5
                                                                    else ctx.needs_input_grad[i + 3])
                  for i, t in enumerate(leaves)]
        q_, w_, u_, g_, h0_, *lr = leaves
        lowrank = [(lr[2 * i], lr[2 * i + 1]) for i in range(ctx.n_lowrank)]
        meta = dict(ctx.meta)
        with torch.enable_grad():
            o, fin, _ = _pipeline(q_, w_, u_, g_, lowrank, h0_, ctx.lay, meta, replay=(states.float(), final))
            d_q, d_w, d_u, d_g, d_h0, *d_lr = leaf_grads(leaves, o, fin, d_o, d_final)
        return (d_q, d_w, d_u, d_g, d_h0, None, None, None, *d_lr)


def leaf_grads(leaves, o, fin, d_o, d_final):
    """Gradients of ``⟨o, d_o⟩ + ⟨fin, d_final⟩`` (either seed may be None) to each of ``leaves``:
    a tensor for the ones that require grad, None for the others (and for None leaves)."""
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    outs, seeds = [o], [torch.zeros_like(o) if d_o is None else d_o]
    if d_final is not None:
        outs.append(fin)
        seeds.append(d_final)
    got = iter(torch.autograd.grad(outs, wanted, seeds, allow_unused=True)) if wanted else iter(())
    return [next(got) if (t is not None and t.requires_grad) else None for t in leaves]


def chunk_matrix(
    q: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    log_decay: Optional[torch.Tensor] = None,
    lowrank: Sequence[Tuple[torch.Tensor, torch.Tensor]] = (),
    *,
    scale: float = 1.0,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
):
    """Matrix-transition recurrence, chunked, on Triton (same contract as
    :func:`olsm.backends.reference.matrix`).

    Args:
        q: queries ``[B, T, H, K]``.
        w: written keys ``[B, T, H, K]``.
        u: written values ``[B, T, H, V]``.
        log_decay: ``None``, ``[B, T, H]`` (scalar per head) or ``[B, T, H, K]`` (per key),
            values ``<= 0``. May be float32 whatever the inputs' dtype.
        lowrank: pairs ``(a, b)``, each ``[B, T, H, K]``; the transition gains ``a bᵀ``.
        scale: readout scale.
        initial_state: ``[B, H, K, V]`` (``[N, H, K, V]`` with ``cu_seqlens``) or ``None``;
            any float dtype (used in float32).
        output_final_state: return the last state.
        cu_seqlens: ``[N + 1]`` boundaries of packed sequences (then ``B == 1``).
        chunk_size: chunk length C, a multiple of 16 in [16, 128].

    Returns:
        ``o [B, T, H, V]`` in q's dtype and the final state ``[B, H, K, V]`` float32 (or ``None``).

    q, w, u, a, b must share one dtype (float32, float16 or bfloat16); all arithmetic is in
    float32. Non-contiguous inputs are accepted (the chunking copies them). Gradients flow to
    q, w, u, log_decay, every a and b, and initial_state.

    Raises:
        BackendError: no CUDA and no ``TRITON_INTERPRET=1``, Triton too old, K or V > 256,
            bfloat16 inputs in an interpreter whose bfloat16 dots are wrong
            (:func:`interpreter_bf16_dots_ok`).
        InputError: wrong shapes, mixed dtypes or devices, bad ``cu_seqlens`` or chunk size.
    """
    lowrank = tuple(tuple(pair) for pair in lowrank)
    _check_backend(q.device, q.dtype)
    _check_inputs(q, w, u, log_decay, lowrank, initial_state, cu_seqlens, chunk_size)
    B, T, H, K = q.shape
    lay = _layout(B, T, chunk_size, cu_seqlens, q.device)
    precision = "ieee" if (q.dtype == torch.float32 or _interpreting()) else "tf32"
    meta = dict(scale=float(scale), out_dtype=q.dtype, precision=precision)
    flat = [t for pair in lowrank for t in pair]
    o, final = ChunkMatrixFunction.apply(q, w, u, log_decay, initial_state, lay, meta, len(lowrank), *flat)
    return o, (final if output_final_state else None)
