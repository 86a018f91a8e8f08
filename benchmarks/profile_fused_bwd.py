"""Where the fused matrix backward spends its time: each kernel of ``kernels/matrix/fused_bwd.py``
timed alone (CUDA events, median ms), with and without a scalar decay, at a few ``num_warps``.

    python benchmarks/profile_fused_bwd.py [--shape 8,2048,16,128] > profile.txt      (GPU)
    TRITON_INTERPRET=1 python benchmarks/profile_fused_bwd.py                         (CPU: dry run)
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.testing

from olsm.kernels.matrix import chunk as ch
from olsm.kernels.matrix import fused_bwd as fb
from olsm.kernels.matrix.fused import launch_shape


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="8,2048,16,128")
    args = ap.parse_args()
    B, T, H, D = (int(x) for x in args.shape.split(","))
    # without a GPU (TRITON_INTERPRET=1): launch every kernel once on a tiny shape, to check the calls
    dry = not torch.cuda.is_available()
    if dry:
        B, T, H, D = 1, 70, 2, 16
    dev, dt = ("cpu", torch.float32) if dry else ("cuda", torch.bfloat16)
    prec = "ieee" if dry else "tf32"
    bench = (lambda k: (k(), 0.0)[1]) if dry else (lambda k: triton.testing.do_bench(k, warmup=25, rep=100))  # noqa: E731
    torch.manual_seed(0)
    q, w, u, do = (torch.randn(B, T, H, D, device=dev, dtype=dt) for _ in range(4))
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device=dev) + 4)
    lay = ch._layout(B, T, 64, None, q.device)
    NC, N, C, K, V = lay.NC, B, 64, D, D
    states = torch.randn(NC, H, K, V, device=dev)
    dstates = torch.empty_like(states)
    dh0 = torch.empty(N, H, K, V, device=dev)
    dq, dw, du = (torch.empty_like(q) for _ in range(3))
    sh = launch_shape(K, V, C)              # the block sizes the real launches use
    BK, BV, BKS = sh.BK, sh.BV, sh.BKS
    NK = triton.cdiv(K, BKS)
    dlam = torch.empty(NK, B * T, H, device=dev)
    print(f"device {torch.cuda.get_device_name() if not dry else 'cpu (interpreter, dry run)'}, "
          f"triton {triton.__version__}, shape {(B, T, H, D)} {dt}")
    for decay in (0, 1):
        gg = g if decay else u
        for nw in (4, 8):
            k1 = lambda: fb._dstate_bwd_kernel[(triton.cdiv(V, BV), N * H)](  # noqa: E731
                q, u, do, gg, u, u, dstates, dstates, dh0, lay.tok_start, lay.tok_stop, lay.chunk_offsets, 0.1,
                H, K=K, V=V, C=C, DECAY=decay, HAS_DFINAL=False, LOWRANK=False, BK=BK, BV=BV, PRECISION=prec,
                num_warps=nw)
            k2 = lambda: fb._dqdw_bwd_kernel[(NK, NC * H)](  # noqa: E731
                q, w, u, do, gg, states, dstates, dq, dw, dlam, lay.tok_start, lay.tok_stop, 0.1, B * T, H,
                K=K, V=V, C=C, DECAY=decay, BKS=BKS, BV=BV, PRECISION=prec, num_warps=nw)
            k3 = lambda: fb._du_bwd_kernel[(triton.cdiv(V, sh.BV_wide), NC * H)](  # noqa: E731
                q, w, do, gg, dstates, du, lay.tok_start, lay.tok_stop, 0.1, H, K=K, V=V, C=C, DECAY=decay,
                BKS=BKS, BV=sh.BV_wide, PRECISION=prec, num_warps=nw)
            times = [bench(k) for k in (k1, k2, k3)]
            print(f"decay={decay} num_warps={nw}: dstate {times[0]:.3f}  dqdw {times[1]:.3f}  du {times[2]:.3f} ms")
        if decay:
            lam = dlam.sum(0)

            def tail():
                ends = fb._sequence_ends(lay)
                return fb._reverse_cumsum_per_sequence(lam, ends)
            print(f"decay tail (torch): {bench(tail):.3f} ms")


if __name__ == "__main__":
    main()
