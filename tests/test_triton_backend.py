"""The public call with backend="triton" (what "auto" picks on CUDA) matches the reference.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
shapes are tiny and float32; tests/test_triton_*_gpu.py cover bf16/fp32 at real sizes on a GPU.
"""
import pytest
import torch

import olsm
from olsm.testing import random_inputs, rel_err

NAMES = ["linear_attention", "gla", "gated_longhorn", "longhorn_diag", "mamba1"]


def outputs(rec, backend, dims, seed, cu_seqlens=None):
    q, k, v, coefs, h0 = random_inputs(rec, dims, seed, dtype=torch.float32, requires_grad=True)
    if cu_seqlens is not None:
        h0 = torch.randn(len(cu_seqlens) - 1, *h0.shape[1:], generator=torch.Generator().manual_seed(seed))
        h0.requires_grad_(True)
    o, S = rec(q, k, v, initial_state=h0, output_final_state=True, backend=backend, chunk_size=16,
               cu_seqlens=cu_seqlens, **coefs)
    g = torch.Generator().manual_seed(1)
    loss = (o * torch.randn(o.shape, generator=g)).sum() + (S * torch.randn(S.shape, generator=g)).sum()
    leaves = [q, k, v, h0, *coefs.values()]
    return [o, S, *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("name", NAMES)
def test_triton_backend_matches_reference(name):
    rec = olsm.derive(name)
    dims = (1, 21, 2, 16, 8)
    cu = torch.tensor([0, 5, 21]) if name in ("gated_longhorn", "mamba1") else None
    ref = outputs(rec, "reference", dims, seed=0, cu_seqlens=cu)
    got = outputs(rec, "triton", dims, seed=0, cu_seqlens=cu)
    for i, (x, r) in enumerate(zip(got, ref)):
        assert rel_err(x.double(), r.double()) < 1e-4, f"{name}: output #{i} differs"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", NAMES + ["longhorn", "deltanet", "gated_deltanet", "mamba2"])
def test_auto_backend_on_gpu(name, dtype):
    """backend='auto' on CUDA (the Triton kernels) vs the float64 reference, at a real size."""
    rec = olsm.derive(name)
    dims = (2, 300, 4, 64, 64) if rec.kind == "matrix" else (2, 300, 1, 16, 256)
    q, k, v, coefs, h0 = random_inputs(rec, dims, seed=0)
    o_ref, S_ref = rec(q, k, v, initial_state=h0, output_final_state=True, backend="torch", **coefs)
    dev = lambda x: x.to("cuda", dtype)  # noqa: E731
    o, S = rec(dev(q), dev(k), dev(v), initial_state=h0.float().cuda(), output_final_state=True,
               **{n: x.float().cuda() for n, x in coefs.items()})
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert o.dtype == dtype
    assert rel_err(o.double().cpu(), o_ref) < tol and rel_err(S.double().cpu(), S_ref) < tol
