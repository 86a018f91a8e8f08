"""Feasibility spike (not used by the product): the elementwise backward's block step in Gluon.

Why: the generated ``tl`` backward (``olsm.kernels.elementwise``) is bound by shuffle and shared-
memory instructions; compiled for sm_90, its body has 31 layout conversions (88 shared-memory
instructions, 15 barriers) and 233 registers, because Triton picks coalesced layouts for the loads
and slice layouts for the reductions and converts between them (benchmarks/README.md, elementwise
section). Gluon (``triton.experimental.gluon``, also in the GPU machine's Triton 3.6) takes explicit
layouts, so the loads can land in slices of the compute layout: tokens in-thread (the scans need no
shuffles), keys over 8 lanes, values over 4.

This is the reverse block step of mamba1 only (no chunk replay, no masks, no varlen), enough to
see what the compiler makes of it. Run on any x86-64 machine (no GPU)::

    python benchmarks/gluon_spike.py

It prints the layout conversions, the instruction mix and the registers of the sm_90 cubin for
three splits of the key/value axes. On 2026-11-30 (Triton 3.9 here), the tl kernel's split
(per thread [8, 2, 1], lanes [1, 8, 4]): 0 conversions, 0 barriers, 0 shared-memory
instructions, 158 shuffles, 156 registers, no spills, 1008 instructions; values in-thread
([8, 1, 4] / [1, 16, 2]) is worse (364 shuffles, 242 registers: sums over K then cross 16 lanes).
The price of the explicit layout: the loads, stores and atomics are not vectorised (41 LDG, 16
STG, 16 RED against the tl kernel's 20, 6 and 2 over both its loops), and the hand-written all-3-D
tl variant showed that scalar memory instructions are expensive there. Not run on a GPU yet: its
speed and its gradients are untested.
"""
import collections
import re
import subprocess
import sys
import tempfile

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.jit
def _affine_excl(a1, b1, e1, f1, a2, b2, e2, f2):
    return a1 * a2, a2 * b1 + b2, a1 * e2, e2 * b1 + f2


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def toy_bwd(q, k, v, do, dt, A, dq, dk, dv, ddt, T,
            BT: gl.constexpr, BK: gl.constexpr, BV: gl.constexpr, V: gl.constexpr,
            SPT_K: gl.constexpr, SPT_V: gl.constexpr, TPW_K: gl.constexpr, TPW_V: gl.constexpr):
    # tokens in-thread (the scans need no shuffles); keys and values split between a thread's
    # registers (SPT_*) and the warp's lanes (TPW_*)
    L3: gl.constexpr = gl.BlockedLayout([BT, SPT_K, SPT_V], [1, TPW_K, TPW_V], [1, 1, 1], [2, 1, 0])
    LTK: gl.constexpr = gl.SliceLayout(2, L3)   # [BT, BK]
    LTV: gl.constexpr = gl.SliceLayout(1, L3)   # [BT, BV]
    LKV: gl.constexpr = gl.SliceLayout(0, L3)   # [BK, BV]
    i_v = gl.program_id(0)
    tk = gl.arange(0, BT, layout=gl.SliceLayout(1, LTK))
    nk = gl.arange(0, BK, layout=gl.SliceLayout(0, LTK))
    tv = gl.arange(0, BT, layout=gl.SliceLayout(1, LTV))
    jv = i_v * BV + gl.arange(0, BV, layout=gl.SliceLayout(0, LTV))
    nA = gl.arange(0, BK, layout=gl.SliceLayout(1, LKV))
    jA = i_v * BV + gl.arange(0, BV, layout=gl.SliceLayout(0, LKV))
    Akv = gl.load(A + jA[None, :] * BK + nA[:, None])
    S0 = gl.zeros([BK, BV], gl.float32, LKV)
    P = gl.zeros([BK, BV], gl.float32, LKV)
    for i in range(0, T // BT):
        t0 = (T // BT - 1 - i) * BT
        offk = (t0 + tk)[:, None] * BK + nk[None, :]
        offv = (t0 + tv)[:, None] * V + jv[None, :]
        q2 = gl.load(q + offk).to(gl.float32)
        k2 = gl.load(k + offk).to(gl.float32)
        v2 = gl.load(v + offv).to(gl.float32)
        do2 = gl.load(do + offv).to(gl.float32)
        dt2 = gl.load(dt + offv).to(gl.float32)
        k3 = gl.expand_dims(k2, 2)
        q3 = gl.expand_dims(q2, 2)
        v3 = gl.expand_dims(v2, 1)
        do3 = gl.expand_dims(do2, 1)
        dt3 = gl.expand_dims(dt2, 1)
        G = gl.exp(gl.expand_dims(Akv, 0) * dt3)
        wv = dt3 * v3
        r3 = gl.expand_dims(gl.expand_dims(gl.arange(0, BT, layout=gl.SliceLayout(1, LTK)), 1), 2)
        b = k3 * wv + G * gl.where(r3 == 0, gl.expand_dims(S0, 0), 0.0)
        one = gl.full([BT, BK, BV], 1.0, gl.float32, L3)
        nz = gl.full([BT, BK, BV], -0.0, gl.float32, L3)
        _, S3, _, Sx3 = gl.associative_scan((G, b, one, nz), 0, _affine_excl)
        dq2 = gl.reduce(S3 * do3, 2, _add)
        gl.atomic_add(dq + offk, dq2, sem="relaxed")
        XP = q3 * do3 + gl.where(r3 == BT - 1, gl.expand_dims(P, 0), 0.0)
        _, Pi3, _, Px3 = gl.associative_scan((G, G * XP, one, nz), 0, _affine_excl, reverse=True)
        P = gl.reduce(gl.where(r3 == 0, Pi3, -0.0), 0, _add)
        dS = XP + Px3
        dG = dS * Sx3
        dk2 = gl.reduce(dS * wv, 2, _add)
        gl.atomic_add(dk + offk, dk2, sem="relaxed")
        dv2 = gl.reduce(dS * k3 * dt3, 1, _add)
        gl.store(dv + offv, dv2.to(dv.dtype.element_ty))
        ddt2 = gl.reduce(dG * gl.expand_dims(Akv, 0) * G + dS * k3 * v3, 1, _add)
        gl.store(ddt + offv, ddt2.to(ddt.dtype.element_ty))
        S0 = gl.reduce(gl.where(r3 == BT - 1, S3, -0.0), 0, _add)


def main():
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from olsm.kernels.aot import _tool

    sig = {n: "*bf16" for n in ("q", "k", "v", "do", "dt", "dv", "ddt")}
    sig.update(A="*fp32", dq="*fp32", dk="*fp32", T="i32")
    names = ["q", "k", "v", "do", "dt", "A", "dq", "dk", "dv", "ddt", "T", "BT", "BK", "BV", "V",
             "SPT_K", "SPT_V", "TPW_K", "TPW_V"]
    print(f"triton {triton.__version__}, sm_90, 1 warp, BT = 8, BK = 16; per thread [8, SPT_K, SPT_V]")
    # (BV, SPT_K, SPT_V, TPW_K, TPW_V): the tl kernel's split (values over lanes), and values
    # in-thread so that v, do, dΔ load as vectors and sums over V need (almost) no shuffles
    for BV, spt_k, spt_v, tpw_k, tpw_v in ((4, 2, 1, 8, 4), (8, 1, 4, 16, 2), (4, 1, 2, 16, 2)):
        cx = dict(BT=8, BK=16, BV=BV, V=1536, SPT_K=spt_k, SPT_V=spt_v, TPW_K=tpw_k, TPW_V=tpw_v)
        signature = {n: ("constexpr" if n in cx else sig[n]) for n in names}
        constants = {(i,): cx[n] for i, n in enumerate(names) if n in cx}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in cx}
        src = GluonASTSource(fn=toy_bwd, signature=signature, constexprs=constants, attrs=attrs)
        c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
            fh.write(c.asm["cubin"])
            fh.flush()
            sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", fh.name], capture_output=True,
                                  text=True).stdout
            res = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", fh.name], capture_output=True,
                                 text=True).stdout
        ops = collections.Counter()
        for line in sass.splitlines():
            m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
            if m:
                ops[m.group(2).split(".")[0]] += 1
        mix = {k: ops[k] for k in ("BAR", "SHFL", "LDS", "STS", "LDG", "STG", "REDG")}
        regs, stack = re.search(r"REG:\d+", res).group(0), re.search(r"STACK:\d+", res).group(0)
        print(f"BV={BV} per-thread [8,{spt_k},{spt_v}] lanes [1,{tpw_k},{tpw_v}]: conversions "
              f"{c.asm['ttgir'].count('convert_layout')}, instructions {sum(ops.values())} {mix}, "
              f"{regs} {stack}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
