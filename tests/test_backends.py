"""Reference vs torch (chunked) through the public call, for every catalogue entry.

float64, relative error <= 1e-10 on outputs, final state and the gradient of every input;
odd lengths (not multiples of the chunk), every chunk size, a random initial state, and
cu_seqlens with 3 packed sequences.
"""
import functools

import pytest
import torch

import olsm
from olsm.testing import random_inputs, rel_err

NAMES = olsm.objectives.__all__
LENGTHS, CHUNKS = (1, 37, 129, 300), (16, 32, 64)
DIMS = dict(B=2, H=2, K=8, V=5)


def run(rec, backend, q, k, v, coefs, h0, **kw):
    o, S = rec(q, k, v, initial_state=h0, output_final_state=True, backend=backend, **coefs, **kw)
    g = torch.Generator().manual_seed(7)
    loss = (o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() + \
        (S * torch.randn(S.shape, generator=g, dtype=S.dtype)).sum()
    leaves = {"q": q, "k": k, "v": v, "initial_state": h0, **coefs}
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {"o": o, "S": S, **{f"d{n}": gr for n, gr in zip(leaves, grads)}}


def outputs(rec, backend, dims, seed, cu=None, chunk_size=64):
    q, k, v, coefs, h0 = random_inputs(rec, dims, seed, requires_grad=True)
    kw = dict(chunk_size=chunk_size)
    if cu is not None:
        kw["cu_seqlens"] = torch.tensor(cu)
        h0 = torch.randn(len(cu) - 1, *h0.shape[1:], dtype=h0.dtype,
                         generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    return run(rec, backend, q, k, v, coefs, h0, **kw)


@functools.lru_cache(maxsize=None)
def reference(name, dims, seed, cu=None):
    """The step-by-step loop is slow: compute it once per case, compare every chunk size to it."""
    return outputs(olsm.derive(name), "reference", dims, seed, cu)


def compare(name, dims, seed, chunk_size, cu=None):
    got = outputs(olsm.derive(name), "torch", dims, seed, cu, chunk_size)
    for what, ref in reference(name, dims, seed, cu).items():
        err = rel_err(got[what], ref)
        assert err <= 1e-10, f"{name}: {what} differs by {err:.2e} (chunk {chunk_size})"


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("name", NAMES)
def test_torch_matches_reference(name, T):
    for chunk in CHUNKS:  # one reference run serves the three chunk sizes
        compare(name, (DIMS["B"], T, DIMS["H"], DIMS["K"], DIMS["V"]), seed=T, chunk_size=chunk)


@pytest.mark.parametrize("name", NAMES)
def test_torch_matches_reference_varlen(name):
    for chunk in CHUNKS:
        compare(name, (1, 121, DIMS["H"], DIMS["K"], DIMS["V"]), seed=3, chunk_size=chunk, cu=(0, 13, 50, 121))


def test_varlen_equals_separate_calls():
    rec = olsm.derive("gated_longhorn")
    q, k, v, coefs, _ = random_inputs(rec, (1, 40, 2, 4, 3), seed=1)
    cu = torch.tensor([0, 9, 40])
    o, S = rec(q, k, v, cu_seqlens=cu, output_final_state=True, backend="torch", **coefs)
    for i, (lo, hi) in enumerate([(0, 9), (9, 40)]):
        oi, Si = rec(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], output_final_state=True, backend="reference",
                     **{n: x[:, lo:hi] for n, x in coefs.items()})
        assert rel_err(o[:, lo:hi], oi) < 1e-12 and rel_err(S[i:i + 1], Si) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_runs_and_keeps_dtype(dtype):
    rec = olsm.derive("longhorn")
    q, k, v, coefs, h0 = random_inputs(rec, (1, 20, 2, 8, 8), seed=0)
    o64, S64 = rec(q, k, v, initial_state=h0, output_final_state=True, backend="reference", **coefs)
    cast = lambda x: x.to(dtype)  # noqa: E731
    o, S = rec(cast(q), cast(k), cast(v), initial_state=h0.float(), output_final_state=True, backend="torch",
               **{n: x.float() for n, x in coefs.items()})
    assert o.dtype == dtype and S.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert rel_err(o.double(), o64) < tol and rel_err(S.double(), S64) < tol


def test_default_scale_is_inverse_sqrt_k():
    rec = olsm.derive("linear_attention")
    q, k, v, coefs, _ = random_inputs(rec, (1, 5, 1, 16, 3), seed=0)
    o1, _ = rec(q, k, v, backend="reference")
    o2, _ = rec(q, k, v, backend="reference", scale=0.25)
    assert torch.allclose(o1, o2)
    o3, S = rec(q, k, v, backend="reference", scale=1.0)
    assert torch.allclose(o3 * 0.25, o1) and S is None
