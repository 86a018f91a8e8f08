"""The benchmark's peer harness (benchmarks/peers_elementwise.py) moves tensors between our
``[B, T, 1, ·]`` layout and the CUDA scans' channels-first one, and compares every gradient
before the peers are timed. The CUDA scans only build on the GPU machine, so here torch stand-ins
with the same call signatures (built from our float64 reference) play the peers: the harness must
report agreement for them, and a disagreement when a stand-in is made wrong."""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import olsm
from olsm.kernels.elementwise import elementwise_scan_torch
from olsm.objectives import longhorn_diag, mamba1

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from peers_elementwise import grad_parity, longhorn_cuda, mamba_cuda  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _ours(x):  # channels-first [B, E, T] / [B, 1, N, T] -> [B, T, 1, ·]
    return (x[:, 0] if x.dim() == 4 else x).transpose(1, 2)[:, :, None]


def _cf(x):  # [B, T, 1, ·] -> [B, ·, T]
    return x[:, :, 0].transpose(1, 2)


class FakeMamba:
    """``selective_scan_cuda``'s fwd/bwd signatures over our reference (no z, no Δ bias)."""

    def __init__(self, wrong: bool = False):
        self.rec, self.wrong = olsm.derive(mamba1), wrong

    def _run(self, u, dt, A, B, C, D):
        o, _ = elementwise_scan_torch(self.rec, _ours(C), _ours(B), _ours(u),
                                      {"dt": _ours(dt), "A": A[None]}, D=D[None])
        return _cf(o)

    def fwd(self, u, dt, A, B, C, D, z, dbias, softplus):
        return [self._run(u, dt, A, B, C, D).to(u.dtype), None]

    def bwd(self, u, dt, A, B, C, D, z, dbias, dout, x, out, dz, softplus, recompute):
        xs = [t.detach().float().requires_grad_(True) for t in (u, dt, A, B, C, D)]
        g = list(torch.autograd.grad(self._run(*xs), xs, dout.float()))
        if self.wrong:
            g[3] = -g[3]  # dB with the wrong sign
        return [g[0].to(u.dtype), g[1].to(dt.dtype), g[2], g[3], g[4], g[5], None]


class FakeLonghorn:
    """``online_selective_scan_cuda``'s signatures over our reference; like the real kernel it
    leaves the kᵀk part of dK to the caller (returned per channel as dTK)."""

    def __init__(self):
        self.rec = olsm.derive(longhorn_diag)

    def _run(self, u, Q, K, T, D, t_bias):
        beta = torch.sigmoid(T + t_bias[None, :, None])
        o, _ = elementwise_scan_torch(self.rec, _ours(Q), _ours(K), _ours(u), {"beta": _ours(beta)}, D=D[None])
        return _cf(o)

    def online_fwd(self, u, Q, K, T, D, t_bias, z):
        return [self._run(u, Q, K, T, D, t_bias).to(u.dtype), None]

    def online_bwd(self, u, Q, K, T, D, t_bias, z, dout, x, out, dz):
        xs = [t.detach().float().requires_grad_(True) for t in (u, Q, K, T)]
        Kd = xs[2]
        kk = Kd.detach().square().sum(2)  # [B, 1, T]
        # split dK as the kernel does: the part through kᵀk comes back per channel (dTK)
        kk_leaf = kk.expand(-1, u.shape[1], -1).clone().requires_grad_(True)  # [B, E, T]
        beta = torch.sigmoid(xs[3] + t_bias[None, :, None])
        o = self._run_kk(xs[0], xs[1], Kd, beta, D, kk_leaf)
        du, dQ, dK, dT, dTK = torch.autograd.grad(o, [xs[0], xs[1], Kd, xs[3], kk_leaf], dout.float())
        dD = (dout.float() * u.float()).sum((0, 2))
        return [du.to(u.dtype), dQ, dK, dT, dD, None, None, dTK]

    def _run_kk(self, u, Q, K, beta, D, kk):
        # the recurrence with kᵀk given separately (per channel), so its gradient can be split off
        B, E, T = u.shape
        S = torch.zeros(B, E, K.shape[2], device=u.device)
        outs = []
        for t in range(T):
            k_t, q_t, b_t = K[:, 0, :, t], Q[:, 0, :, t], beta[:, :, t]
            eps = b_t / (1 + b_t * kk[:, :, t])  # [B, E]
            S = S * (1 - eps[:, :, None] * k_t[:, None, :] ** 2) + (eps * u[:, :, t])[:, :, None] * k_t[:, None, :]
            outs.append((S * q_t[:, None, :]).sum(-1) + D[None] * u[:, :, t])
        return torch.stack(outs, -1)


def test_parity_harness_agrees_with_a_faithful_peer_and_catches_a_wrong_one():
    rec = olsm.derive(mamba1)
    ok = grad_parity(rec, mamba_cuda, FakeMamba(), T=23, E=8, dtype=torch.float32, device=DEV)
    assert set(ok) == {"o", "v", "dt", "A", "k", "q", "D"}
    assert max(ok.values()) < 1e-4, ok
    bad = grad_parity(rec, mamba_cuda, FakeMamba(wrong=True), T=23, E=8, dtype=torch.float32, device=DEV)
    assert bad["k"] > 1.0 and max(v for n, v in bad.items() if n != "k") < 1e-4


def test_longhorn_peer_finishes_dk_with_the_kk_term():
    rec = olsm.derive(longhorn_diag)
    ok = grad_parity(rec, longhorn_cuda, FakeLonghorn(), T=19, E=8, dtype=torch.float32, device=DEV)
    assert set(ok) == {"o", "v", "q", "k", "beta", "D"}
    assert max(ok.values()) < 1e-4, ok
