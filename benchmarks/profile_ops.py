"""Where one forward+backward of our matrix kernel spends its GPU time, kernel by kernel.

Runs ``bench_matrix.ours(method, ...)`` (the same inputs and coefficient algebra the benchmark
times) a few times under ``torch.profiler`` and prints, per method, the CUDA kernels sorted by
total time: Triton kernels, cuBLAS calls and the small torch ops of the coefficient algebra alike.
Use it to see which launch to attack before touching a kernel.

    python benchmarks/profile_ops.py --methods mamba2 deltanet [--shape 8,2048,16,128] \
        [--variant new] [--top 25] [--forward] [--fla] [--autotune-cache T] > profile_ops.txt   (GPU only)

``--forward`` profiles the forward alone (no autograd graph); ``--fla`` profiles FLA's kernel for
the same recurrence after ours (``bench_matrix.theirs``; its backward refuses some members on
Triton 3.6, which is reported, not raised).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_matrix as bm  # noqa: E402


def kernel_times(method, shape, variant="new", reps=5, forward=False, fla=None):
    """CUDA time per step of ``method``, by kernel name, in ms.

    Args:
        method: one of ``bench_matrix.METHODS`` (not ``sdpa``).
        shape: (B, T, H, D).
        variant: a key of ``bench_matrix.VARIANTS`` (code path of ours).
        reps: profiled steps (after two warm-up steps that compile).
        forward: a step is the forward alone (under ``no_grad``), else forward+backward.
        fla: FLA's functions (``bench_matrix.import_fla()``): profile FLA's kernel instead of ours.

    Returns:
        ``{kernel name: (calls per step, ms per step)}``.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    km = bm.import_kernels()
    delta = bm.set_variant(variant)
    x = bm.make_inputs(*shape)
    leaves = list(x.values())
    run = (lambda: bm.theirs(method, x, fla)) if fla else (lambda: bm.ours(method, x, km, delta))  # noqa: E731
    d_o = torch.randn_like(run())

    def step():
        if forward:
            with torch.no_grad():
                run()
            return
        for t in leaves:
            t.grad = None
        run().backward(d_o)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {e.key: (e.count / reps, e.device_time_total / reps / 1e3) for e in events}


def profile(method, shape, variant, top, forward=False, fla=None):
    """Print the ``top`` CUDA kernels of one step of ``method`` (see :func:`kernel_times`)."""
    try:
        times = sorted(kernel_times(method, shape, variant, forward=forward, fla=fla).items(), key=lambda kv: -kv[1][1])
    except Exception as err:  # noqa: BLE001 - FLA refuses some backwards on Triton 3.6: say so, go on
        if not fla:
            raise     # ours failing is a bug, not a row
        print(f"\n## {method} FLA {shape}: failed: {err!r:.300}")
        return
    total = sum(ms for _, (_, ms) in times)
    who = f"FLA {bm.FLA_NAME.get(method, '')}" if fla else f"ours@{variant}"
    print(f"\n## {method} {who} {shape}: {total:.3f} ms of kernel time per {'fwd' if forward else 'fwd+bwd'}")
    print("| kernel | calls/step | ms/step | share |\n|---|---|---|---|")
    for key, (calls, ms) in times[:top]:
        print(f"| {key[:90]} | {calls:g} | {ms:.3f} | {100 * ms / total:.1f}% |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="*", default=["linear_attention", "mamba2", "deltanet"])
    ap.add_argument("--shape", default="8,2048,16,128")
    ap.add_argument("--variant", default="new", type=bm.variant_name)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--forward", action="store_true", help="profile the forward alone")
    ap.add_argument("--fla", action="store_true", help="also profile FLA's kernel for each method")
    ap.add_argument("--autotune-cache", help="tar of Triton autotuning results for FLA (autotune_cache.py)")
    args = ap.parse_args()
    shape = tuple(int(p) for p in args.shape.split(","))
    if args.autotune_cache:
        import autotune_cache

        autotune_cache.enable(args.autotune_cache)
    fla = bm.import_fla() if args.fla else None
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for method in args.methods:
        profile(method, shape, args.variant, args.top, args.forward)
        if fla and method in bm.FLA_NAME:
            profile(method, shape, args.variant, args.top, args.forward, fla)


if __name__ == "__main__":
    main()
