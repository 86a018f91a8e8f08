"""The chunked ``torch`` backend against the step-by-step reference.

Everything runs in float64 and is compared with :func:`rel_err`,
``max|x - y| / max(1, max|y|)`` (absolute error for entries of size <= 1, relative to the
largest entry otherwise), which must stay below ``TOL = 1e-10`` for the outputs, the final
state and the gradient with respect to every input. The chunked form reorders sums, so a
correct implementation lands near 1e-14; an off-by-one (a decay ratio shifted by one token, a
probe that sees S_t instead of S_{t-1}) shows up as O(1e-2) or worse.

The reference is a Python loop, so B and H stay tiny and the cases form a covering subset
rather than the full product: every decay kind x rank x initial state appears, and across them
every (T, chunk_size) pair.
"""
from __future__ import annotations

import itertools
import zlib

import pytest
import torch
import torch.nn.functional as Fn

from olsm.backends import chunked, reference

TOL = 1e-10
DT = torch.float64
TS = (1, 37, 129, 300)
CHUNKS = (16, 32, 64)
DIMS = ((8, 5), (16, 16))  # (K, V)
CU_SEQLENS = (0, 13, 50, 91)  # three packed sequences of odd lengths 13, 37, 41


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    """``max|x - y| / max(1, max|y|)``; ``y`` is the reference."""
    return ((x - y).abs().max() / y.abs().max().clamp_min(1.0)).item()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=DT)


def _matrix_inputs(seed, B, T, H, K, V, decay, rank, init, delta=False, n_states=None):
    """Leaf tensors for the matrix class, as a dict of keyword arguments.

    ``delta`` builds a delta-rule-like transition D - Σ_r β_r k_r k_rᵀ (a = -β k, b = k with
    unit k, β in (0, 1), β split over the ranks so the transition stays contractive);
    otherwise a, b are small random vectors so that products of transitions stay bounded.
    """
    g = _gen(seed)
    kw = dict(q=_randn(g, B, T, H, K), w=_randn(g, B, T, H, K), u=_randn(g, B, T, H, V))
    if decay == "head":
        kw["log_decay"] = Fn.logsigmoid(_randn(g, B, T, H) + 3.0)
    elif decay == "key":
        kw["log_decay"] = Fn.logsigmoid(_randn(g, B, T, H, K) + 3.0)
    lowrank = []
    for _ in range(rank):
        if delta:
            k = Fn.normalize(_randn(g, B, T, H, K), dim=-1)
            beta = torch.rand(B, T, H, 1, generator=g, dtype=DT) / rank
            lowrank.append((-beta * k, k.clone()))
        else:
            lowrank.append((0.3 * _randn(g, B, T, H, K) / K**0.5, 0.3 * _randn(g, B, T, H, K) / K**0.5))
    kw["lowrank"] = tuple(lowrank)
    if init:
        kw["initial_state"] = _randn(g, n_states or B, H, K, V)
    for x in _leaves(kw):
        x.requires_grad_(True)
    return kw


def _elementwise_inputs(seed, B, T, H, K, V, init, n_states=None, gate=None):
    g = _gen(seed)
    kw = dict(q=_randn(g, B, T, H, K), w=_randn(g, B, T, H, K), u=_randn(g, B, T, H, V))
    if gate is None:
        # gates in (0.8, 1]: long memory, so an error in how chunks hand over the state shows
        # (with gates in (0, 1) the state forgets within a few tokens and hides such bugs)
        gate = 1 - 0.2 * torch.rand(B, T, H, K, V, generator=g, dtype=DT)
    kw["gate"] = gate
    if init:
        kw["initial_state"] = _randn(g, n_states or B, H, K, V)
    for x in _leaves(kw):
        x.requires_grad_(True)
    return kw


def _leaves(kw):
    """Every tensor input (lowrank pairs flattened), in a fixed order, with a name."""
    out = []
    for name, x in kw.items():
        if isinstance(x, tuple):
            out += [y for pair in x for y in pair]
        elif isinstance(x, torch.Tensor):
            out.append(x)
    return out


def _names(kw):
    names = []
    for name, x in kw.items():
        if isinstance(x, tuple):
            names += [f"{name}[{r}].{ab}" for r in range(len(x)) for ab in "ab"]
        elif isinstance(x, torch.Tensor):
            names.append(name)
    return names


def _run_and_grad(fn, kw, seed, **opts):
    """Forward with ``output_final_state=True``, then gradients of a random linear functional
    of (o, S) with respect to every leaf input."""
    o, S = fn(**kw, output_final_state=True, **opts)
    g = _gen(seed + 1000)
    loss = (o * _randn(g, *o.shape)).sum() + (S * _randn(g, *S.shape)).sum()
    grads = torch.autograd.grad(loss, _leaves(kw))
    return o.detach(), S.detach(), grads


def _assert_matches(backend_fn, reference_fn, kw, seed, **opts):
    o, S, grads = _run_and_grad(backend_fn, kw, seed, **opts)
    opts.pop("chunk_size", None)
    o_ref, S_ref, grads_ref = _run_and_grad(reference_fn, kw, seed, **opts)
    errors = {"o": rel_err(o, o_ref), "S": rel_err(S, S_ref)}
    for name, gx, gy in zip(_names(kw), grads, grads_ref):
        errors[f"d{name}"] = rel_err(gx, gy)
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"errors above {TOL}: {bad}"
    return errors


# --- matrix class -------------------------------------------------------------------------

# initial state x decay x rank in full; T, chunk_size and dims cycle along the list so that the
# first 12 cases already hit every (T, chunk_size) pair (4 and 3 are coprime), and each half
# (zero / random initial state) sees every T.
MATRIX_CASES = [
    (decay, rank, init, TS[i % 4], CHUNKS[i % 3], DIMS[(i // 3) % 2])
    for i, (init, decay, rank) in enumerate(itertools.product((False, True), ("none", "head", "key"), (0, 1, 2)))
]


@pytest.mark.parametrize(
    "decay,rank,init,T,chunk_size,dims", MATRIX_CASES,
    ids=[f"{d}-r{r}-{'h0' if i else 'zero'}-T{T}-C{c}-K{k}V{v}" for d, r, i, T, c, (k, v) in MATRIX_CASES],
)
def test_matrix_matches_reference(decay, rank, init, T, chunk_size, dims):
    K, V = dims
    seed = zlib.crc32(f"{decay}{rank}{init}{T}".encode())  # deterministic across workers
    kw = _matrix_inputs(seed, 2, T, 2, K, V, decay, rank, init)
    _assert_matches(chunked.matrix, reference.matrix, kw, seed, scale=K**-0.5, chunk_size=chunk_size)


@pytest.mark.parametrize(
    "decay,rank,T,chunk_size",
    [("none", 1, 300, 64), ("head", 1, 129, 32), ("key", 1, 37, 16), ("head", 2, 129, 16)],
)
def test_matrix_delta_rule(decay, rank, T, chunk_size):
    """DeltaNet / Gated DeltaNet / KDA-like transitions D - β k kᵀ (rank 2: two such terms)."""
    K, V = 16, 16
    kw = _matrix_inputs(7, 1, T, 2, K, V, decay, rank, init=True, delta=True)
    _assert_matches(chunked.matrix, reference.matrix, kw, 7, scale=K**-0.5, chunk_size=chunk_size)


@pytest.mark.parametrize(
    "decay,rank,init,chunk_size",
    [("key", 2, True, 16), ("head", 1, False, 32), ("none", 0, True, 64), ("none", 1, False, 16)],
)
def test_matrix_varlen(decay, rank, init, chunk_size):
    """Packed sequences: each starts from its own initial state (or zero), none leaks into the next."""
    T = CU_SEQLENS[-1]
    kw = _matrix_inputs(11, 1, T, 2, 8, 5, decay, rank, init, n_states=len(CU_SEQLENS) - 1)
    cu = torch.tensor(CU_SEQLENS)
    _assert_matches(chunked.matrix, reference.matrix, kw, 11, cu_seqlens=cu, chunk_size=chunk_size)


@pytest.mark.parametrize("decay", ["head", "key"])
def test_matrix_strong_decay_is_finite_and_exact(decay):
    """log-decay -30 per token: Γ_t underflows to 0 within a chunk (exp(-30 * 64)), so a form
    that divides by Γ_s or takes exp(-cum) would give inf/nan; ratios within a chunk stay exact."""
    kw = _matrix_inputs(3, 1, 70, 2, 8, 5, decay, 1, init=True)
    with torch.no_grad():
        kw["log_decay"].mul_(0).add_(-30.0)
    errors = _assert_matches(chunked.matrix, reference.matrix, kw, 3, chunk_size=64)
    assert all(v == v for v in errors.values())  # no nan slipped through the comparison


# --- elementwise class --------------------------------------------------------------------

ELEMENTWISE_CASES = [
    (T, init, CHUNKS[i % 3], DIMS[(i // 2 + i) % 2])
    for i, (T, init) in enumerate(itertools.product(TS, (False, True)))
]


@pytest.mark.parametrize(
    "T,init,chunk_size,dims", ELEMENTWISE_CASES,
    ids=[f"T{T}-{'h0' if i else 'zero'}-C{c}-K{k}V{v}" for T, i, c, (k, v) in ELEMENTWISE_CASES],
)
def test_elementwise_matches_reference(T, init, chunk_size, dims):
    K, V = dims
    kw = _elementwise_inputs(T, 2, T, 2, K, V, init)
    _assert_matches(chunked.elementwise, reference.elementwise, kw, T, scale=K**-0.5, chunk_size=chunk_size)


def test_elementwise_gates_with_zeros_negatives_and_underflow():
    """Gates that are exactly 0, negative, or so small that their running product underflows:
    a scan of products (no division by cumulative gates) must stay exact and finite."""
    B, T, H, K, V = 1, 67, 1, 8, 5
    g = _gen(5)
    gate = torch.rand(B, T, H, K, V, generator=g, dtype=DT) * 2 - 0.5   # some negative
    gate[:, 10] = 0.0                                                     # a hard reset
    gate[:, 20:40, :, :4] = 1e-30                                         # product underflows
    kw = _elementwise_inputs(5, B, T, H, K, V, init=True, gate=gate)
    _assert_matches(chunked.elementwise, reference.elementwise, kw, 5, chunk_size=64)


@pytest.mark.parametrize("init,chunk_size", [(True, 16), (False, 64)])
def test_elementwise_varlen(init, chunk_size):
    T = CU_SEQLENS[-1]
    kw = _elementwise_inputs(13, 1, T, 2, 8, 5, init, n_states=len(CU_SEQLENS) - 1)
    cu = torch.tensor(CU_SEQLENS)
    _assert_matches(chunked.elementwise, reference.elementwise, kw, 13, cu_seqlens=cu, chunk_size=chunk_size)


# --- contract: dtypes, defaults, errors ---------------------------------------------------


@pytest.mark.parametrize("kind", ["matrix", "elementwise"])
def test_dtype_rules_and_optional_state(kind):
    """o comes back in q's dtype, the state in the accumulation dtype (float32 for bf16/fp32),
    no state without output_final_state, and chunk_size=None means the default."""
    B, T, H, K, V = 1, 20, 1, 8, 5
    g = _gen(17)
    q, w = torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, K, generator=g)
    u = torch.randn(B, T, H, V, generator=g)
    if kind == "matrix":
        extra = dict(log_decay=Fn.logsigmoid(torch.randn(B, T, H, K, generator=g) + 3))
        fn, ref = chunked.matrix, reference.matrix
    else:
        extra = dict(gate=torch.rand(B, T, H, K, V, generator=g))
        fn, ref = chunked.elementwise, reference.elementwise
    o_ref, S_ref = ref(q.double(), w.double(), u.double(), **{k: v.double() for k, v in extra.items()},
                       output_final_state=True)
    for dtype in (torch.float32, torch.bfloat16):
        o, S = fn(q.to(dtype), w.to(dtype), u.to(dtype), **{k: v.to(dtype) for k, v in extra.items()},
                  output_final_state=True, chunk_size=None)
        assert o.dtype == dtype and S.dtype == torch.float32
        if dtype == torch.float32:
            assert rel_err(o.double(), o_ref) < 1e-5 and rel_err(S.double(), S_ref) < 1e-5
    o, S = fn(q, w, u, **extra)
    assert S is None and o.shape == (B, T, H, V)


@pytest.mark.parametrize("kind", ["matrix", "elementwise"])
@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_chunk_size_raises(kind, bad):
    q = torch.randn(1, 4, 1, 2)
    u = torch.randn(1, 4, 1, 3)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        if kind == "matrix":
            chunked.matrix(q, q, u, chunk_size=bad)
        else:
            chunked.elementwise(q, q, u, torch.ones(1, 4, 1, 2, 3), chunk_size=bad)
