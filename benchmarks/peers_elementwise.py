"""The CUDA scans the elementwise-gate benchmark times next to ours, built on the GPU machine.

* ``longhorn-cuda``: the Longhorn paper's online selective scan (``online_selective_scan_cuda``
  from the public repo Cranial-XIX/longhorn_cuda, a modified mamba_ssm scan);
* ``mamba-ssm``: mamba_ssm's ``selective_scan_cuda`` (state-spaces/mamba), the kernel behind
  ``selective_scan_fn``.

Neither is vendored: their ``csrc/selective_scan`` folders are carried to the GPU machine in
git-ignored folders (DESIGN §7) and compiled there with ``torch.utils.cpp_extension.load``
for sm_90. mamba_ssm's full build is nine files (every input dtype × real/complex weights,
more than seven minutes); we compile a copy pruned to what the benchmark calls, bfloat16
inputs with real float32 weights: the binding's dtype dispatch is narrowed to that one pair
and the complex instantiation dropped, leaving three files. The kernels themselves are
untouched.

Both take channels-first tensors: u, Δ (or dt) ``[B, E, T]`` and B = k, C = q as
``[B, 1, N, T]``; the runners below convert our ``[B, T, 1, ·]`` inputs once, outside the
timed region (each implementation is timed in its own natural layout).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

_CUDA_FLAGS = [
    "-O3", "-std=c++17", "-gencode", "arch=compute_90,code=sm_90", "--use_fast_math",
    "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr", "--expt-extended-lambda", "-lineinfo",
]


def _load(name: str, sources, build_dir: Path):
    from torch.utils.cpp_extension import load

    build_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", "16")
    # each build gets its own directory: a build killed by a timeout leaves a lock file that
    # makes the next load() in the same directory wait forever
    return load(name=name, sources=[str(s) for s in sources], extra_cflags=["-O3", "-std=c++17"],
                extra_cuda_cflags=_CUDA_FLAGS, build_directory=str(build_dir), verbose=False)


# ------------------------------------------------------------------------------ Longhorn
def build_longhorn(src: Path, build_dir: Path):
    """Compile the Longhorn paper's online selective scan (three sources) for sm_90."""
    files = ("online_selective_scan.cpp", "selective_scan_online_fwd.cu", "selective_scan_online_bwd.cu")
    return _load("online_selective_scan_cuda", [src / f for f in files], build_dir)


def _channels_first(q, k, v, x):
    """u, Q, K, x in the selective-scan layout: ``[B, E, T]`` and ``[B, 1, N, T]``."""
    u = v[:, :, 0].transpose(1, 2).contiguous()
    Q = q[:, :, 0].permute(0, 2, 1).unsqueeze(1).contiguous()
    Kt = k[:, :, 0].permute(0, 2, 1).unsqueeze(1).contiguous()
    return u, Q, Kt, x[:, :, 0].transpose(1, 2).contiguous()


def _ours(x):
    """A peer's channels-first ``[B, E, T]`` (or ``[B, 1, N, T]``) gradient as our ``[B, T, 1, ·]``."""
    if x.dim() == 4:
        x = x[:, 0]
    return x.transpose(1, 2)[:, :, None]


def longhorn_cuda(ext, q, k, v, coefs, D):
    """The paper's scan on our longhorn_diag inputs: ``(fwd, fwdbwd, grads)`` closures.

    It computes β = sigmoid(dt + t_bias) itself, so dt = logit(β) and t_bias = 0. Its kernel
    leaves one term of dK to its Python autograd function: the key also enters through kᵀk
    (in β / (1 + β kᵀk)), whose gradient the kernel returns per channel as dTK; the function
    adds 2 k Σ_channels dTK. ``fwdbwd`` does the same, so both sides are timed on the same work.
    ``grads(dout)`` returns the gradients in our layout and names (``beta`` as ∂L/∂dt, the
    logit's gradient: compare with ∂L/∂β · β (1 − β)).
    """
    beta = coefs["beta"].float().clamp(1e-4, 1 - 1e-4)
    u, Q, Kt, dt = _channels_first(q, k, v, torch.logit(beta).to(v.dtype))
    Dv = D[0].float().contiguous()
    t_bias = torch.zeros(v.shape[-1], device=v.device, dtype=torch.float32)

    def fwd():
        return ext.online_fwd(u, Q, Kt, dt, Dv, t_bias, None)

    def bwd(out, x, dout):
        du, dQ, dK, dT, dD, _, _, dTK = ext.online_bwd(u, Q, Kt, dt, Dv, t_bias, None, dout, x, out, None)
        dK = (dK + dTK.sum(1, keepdim=True).unsqueeze(1) * 2.0 * Kt).to(Kt.dtype)
        return du, dQ, dK, dT, dD

    def fwdbwd():
        out, x, *_ = fwd()
        bwd(out, x, out)

    def grads(dout):
        out, x, *_ = fwd()
        du, dQ, dK, dT, dD = bwd(out, x, dout[:, :, 0].transpose(1, 2).contiguous().to(out.dtype))
        return {"o": _ours(out), "v": _ours(du), "q": _ours(dQ), "k": _ours(dK), "beta": _ours(dT), "D": dD[None]}

    return fwd, fwdbwd, grads


# ------------------------------------------------------------------------------ mamba_ssm
_BF16_ONLY = r'''
// pruned for the benchmark: bfloat16 inputs and real float32 weights only
#undef DISPATCH_ITYPE_FLOAT_AND_HALF_AND_BF16
#define DISPATCH_ITYPE_FLOAT_AND_HALF_AND_BF16(ITYPE, NAME, ...)                   \
    if (ITYPE == at::ScalarType::BFloat16) {                                       \
        using input_t = at::BFloat16;                                              \
        __VA_ARGS__();                                                             \
    } else {                                                                       \
        AT_ERROR(#NAME, " pruned benchmark build: bfloat16 inputs only");          \
    }
#undef DISPATCH_WTYPE_FLOAT_AND_COMPLEX
#define DISPATCH_WTYPE_FLOAT_AND_COMPLEX(WTYPE, NAME, ...)                         \
    if (WTYPE == at::ScalarType::Float) {                                          \
        using weight_t = float;                                                    \
        __VA_ARGS__();                                                             \
    } else {                                                                       \
        AT_ERROR(#NAME, " pruned benchmark build: float32 weights only");          \
    }
'''


def prune_mamba_sources(src: Path, dst: Path) -> list:
    """Copy mamba_ssm's selective-scan sources to ``dst`` narrowed to bf16 / real weights.

    Returns:
        The three source paths to compile (binding, bf16 forward, bf16 real backward).

    Raises:
        RuntimeError: the sources do not have the layout this pruning expects.
    """
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    cpp = dst / "selective_scan.cpp"
    text = cpp.read_text()
    anchor = text.find("template<typename input_t, typename weight_t>")
    if anchor < 0 or "DISPATCH_WTYPE_FLOAT_AND_COMPLEX" not in text:
        raise RuntimeError(f"unexpected mamba_ssm sources in {src}: dispatch macros not found")
    cpp.write_text(text[:anchor] + _BF16_ONLY + text[anchor:])
    fwd = dst / "selective_scan_fwd_bf16.cu"
    fwd.write_text(re.sub(r"^template void selective_scan_fwd_cuda<at::BFloat16, complex_t>.*$", "",
                          fwd.read_text(), flags=re.M))
    return [cpp, fwd, dst / "selective_scan_bwd_bf16_real.cu"]


def build_mamba(src: Path, build_dir: Path):
    """Compile mamba_ssm's selective scan, pruned to bf16 inputs and real weights, for sm_90."""
    sources = prune_mamba_sources(src, build_dir / "src")
    return _load("selective_scan_cuda_bf16", sources, build_dir)


def mamba_cuda(ext, q, k, v, coefs, D):
    """mamba_ssm's selective scan on our mamba1 inputs: ``(fwd, fwdbwd, grads)`` closures.

    Our mamba1 is exactly its recurrence with B = k, C = q, u = v, Δ = dt, A ``[E, N]``, no z,
    no Δ bias and no softplus inside. ``grads(dout)`` returns its gradients in our layout and names.
    """
    u, Q, Kt, dt = _channels_first(q, k, v, coefs["dt"])
    A = coefs["A"][0].float().contiguous()  # [H = 1, E, N] -> [E, N]
    Dv = D[0].float().contiguous()

    def fwd():
        return ext.fwd(u, dt, A, Kt, Q, Dv, None, None, False)

    def bwd(out, x, dout):
        # du, dΔ, dA, dB, dC, dD, dΔ_bias
        return ext.bwd(u, dt, A, Kt, Q, Dv, None, None, dout, x, None, None, False, False)

    def fwdbwd():
        out, x, *_ = fwd()
        bwd(out, x, out)

    def grads(dout):
        out, x, *_ = fwd()
        du, ddt, dA, dB, dC, dD, _ = bwd(out, x, dout[:, :, 0].transpose(1, 2).contiguous().to(out.dtype))
        return {"o": _ours(out), "v": _ours(du), "dt": _ours(ddt), "A": dA[None], "k": _ours(dB),
                "q": _ours(dC), "D": dD[None]}

    return fwd, fwdbwd, grads


def grad_parity(rec, runner, ext, T: int = 4096, E: int = 64, seed: int = 3, dtype=torch.bfloat16,
                device: str = "cuda") -> dict:
    """``‖ours − theirs‖ / ‖theirs‖`` of the output and every gradient, ours against a peer's.

    One sequence of T = 4096 tokens (longer than the peers' 2048-token chunks, so their chunk
    carry is exercised), E = 64 channels, bf16, a random output cotangent. For Longhorn the β
    gradient is compared in the peer's dt = logit(β) coordinates. (``dtype``/``device``: for the
    CPU test of this harness, which stands in torch versions of the peers.)
    """
    from bench_elementwise import make_inputs
    from olsm.kernels.elementwise import elementwise_scan

    name = rec.name
    q, k, v, coefs, D = make_inputs(name, 1, T, E, dtype=dtype, seed=seed, device=device)
    D = torch.randn_like(D)
    leaves = {"q": q, "k": k, "v": v, "D": D, **coefs}
    xs = {n: x.detach().clone().requires_grad_(True) for n, x in leaves.items()}
    o, _ = elementwise_scan(rec, xs["q"], xs["k"], xs["v"], {c: xs[c] for c in coefs}, scale=1.0, D=xs["D"])
    dout = torch.randn_like(o)
    ours = dict(zip(xs, torch.autograd.grad(o, list(xs.values()), dout)), o=o.detach())
    if "beta" in ours:
        beta = coefs["beta"].float().clamp(1e-4, 1 - 1e-4)
        ours["beta"] = ours["beta"].float() * beta * (1 - beta)
    theirs = runner(ext, q, k, v, coefs, D)[2](dout)
    return {n: ((ours[n].float() - t.float()).norm() / t.float().norm().clamp_min(1e-30)).item()
            for n, t in theirs.items()}
