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


def longhorn_cuda(ext, q, k, v, coefs, D):
    """The paper's scan on our longhorn_diag inputs: ``(fwd, fwdbwd, args)`` closures.

    It computes β = sigmoid(dt + t_bias) itself, so dt = logit(β) and t_bias = 0.
    """
    beta = coefs["beta"].float().clamp(1e-4, 1 - 1e-4)
    u, Q, Kt, dt = _channels_first(q, k, v, torch.logit(beta).to(v.dtype))
    Dv = D[0].float().contiguous()
    t_bias = torch.zeros(v.shape[-1], device=v.device, dtype=torch.float32)

    def fwd():
        return ext.online_fwd(u, Q, Kt, dt, Dv, t_bias, None)

    def fwdbwd():
        out, x, *_ = ext.online_fwd(u, Q, Kt, dt, Dv, t_bias, None)
        ext.online_bwd(u, Q, Kt, dt, Dv, t_bias, None, out, x, out, None)

    return fwd, fwdbwd, (u, Q, Kt, dt, Dv, t_bias)


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
    """mamba_ssm's selective scan on our mamba1 inputs: ``(fwd, fwdbwd, args)`` closures.

    Our mamba1 is exactly its recurrence with B = k, C = q, u = v, Δ = dt, A ``[E, N]``, no z,
    no Δ bias and no softplus inside.
    """
    u, Q, Kt, dt = _channels_first(q, k, v, coefs["dt"])
    A = coefs["A"][0].float().contiguous()  # [H = 1, E, N] -> [E, N]
    Dv = D[0].float().contiguous()

    def fwd():
        return ext.fwd(u, dt, A, Kt, Q, Dv, None, None, False)

    def fwdbwd():
        out, x, *_ = ext.fwd(u, dt, A, Kt, Q, Dv, None, None, False)
        ext.bwd(u, dt, A, Kt, Q, Dv, None, None, out, x, None, None, False, False)

    return fwd, fwdbwd, (u, Q, Kt, dt, A, Dv)


def parity(ours: torch.Tensor, fwd) -> float:
    """``‖ours − theirs‖ / ‖theirs‖`` of our ``[B, T, 1, E]`` output and a peer's ``[B, E, T]``."""
    theirs = fwd()[0].transpose(1, 2)[:, :, None].float()
    return ((ours.float() - theirs).norm() / theirs.norm()).item()
