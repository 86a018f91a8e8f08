"""Where one forward+backward of our matrix kernel spends its GPU time, kernel by kernel.

Runs ``bench_matrix.ours(method, ...)`` (the same inputs and coefficient algebra the benchmark
times) a few times under ``torch.profiler`` and prints, per method, the CUDA kernels sorted by
total time: Triton kernels, cuBLAS calls and the small torch ops of the coefficient algebra alike.
Use it to see which launch to attack before touching a kernel.

    python benchmarks/profile_ops.py --methods mamba2 deltanet [--shape 8,2048,16,128] \
        [--variant new] [--top 25] > profile_ops.txt        (GPU only)
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_matrix as bm  # noqa: E402


def kernel_times(method, shape, variant="new", reps=5):
    """CUDA time per forward+backward step of ``method``, by kernel name, in ms.

    Args:
        method: one of ``bench_matrix.METHODS`` (not ``sdpa``).
        shape: (B, T, H, D).
        variant: a key of ``bench_matrix.VARIANTS`` (code path of ours).
        reps: profiled steps (after two warm-up steps that compile).

    Returns:
        ``{kernel name: (calls per step, ms per step)}``.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    km = bm.import_kernels()
    delta = bm.set_variant(variant)
    x = bm.make_inputs(*shape)
    leaves = list(x.values())
    o = bm.ours(method, x, km, delta)
    d_o = torch.randn_like(o)

    def step():
        for t in leaves:
            t.grad = None
        bm.ours(method, x, km, delta).backward(d_o)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {e.key: (e.count / reps, e.device_time_total / reps / 1e3) for e in events}


def profile(method, shape, variant, top):
    """Print the ``top`` CUDA kernels of one forward+backward of ``method`` (see :func:`kernel_times`)."""
    times = sorted(kernel_times(method, shape, variant).items(), key=lambda kv: -kv[1][1])
    total = sum(ms for _, (_, ms) in times)
    print(f"\n## {method}@{variant} {shape}: {total:.3f} ms of kernel time per fwd+bwd")
    print("| kernel | calls/step | ms/step | share |\n|---|---|---|---|")
    for key, (calls, ms) in times[:top]:
        print(f"| {key[:90]} | {calls:g} | {ms:.3f} | {100 * ms / total:.1f}% |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="*", default=["linear_attention", "mamba2", "deltanet"])
    ap.add_argument("--shape", default="8,2048,16,128")
    ap.add_argument("--variant", default="new", type=bm.variant_name)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    shape = tuple(int(p) for p in args.shape.split(","))
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for method in args.methods:
        profile(method, shape, args.variant, args.top)


if __name__ == "__main__":
    main()
