"""Sweep the block sizes and warps of the fused matrix kernels on the GPU, one knob at a time.

Every launch of :mod:`olsm.kernels.matrix.fused` and :mod:`~olsm.kernels.matrix.fused_bwd`
takes its tiles and ``num_warps`` from ``launch_shape()``. This script replaces one field at a time, runs a profiled
forward+backward per method (``profile_ops.kernel_times``) and prints, per kernel, its time under
each change next to the default, so the best value of each field can be read off and written
back into ``launch_shape``. Each kernel depends on a few fields only, so one-at-a-time changes
cover what matters at a fraction of a full grid.

    python benchmarks/tune_fused.py [--shape 8,2048,16,128] [--methods mamba2 gated_deltanet]
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_matrix as BM  # noqa: E402
import profile_ops  # noqa: E402

from olsm.kernels.matrix import delta, fused, fused_bwd  # noqa: E402

# (field, value) of fused.LaunchShape; the opposite of each default at K = V = 128, C = 64
CHANGES = [("warps_seq", 8), ("warps_walk_decay", 4), ("warps_delta_decay", 8), ("warps_state_lr", 4), ("BV", 32), ("BV_dqdw", 64), ("warps_out", 8),
           ("BV_out", 32), ("BV_out", 64),
           ("warps_wy", 8), ("BV_wide", 32), ("BV_wide", 128), ("warps_chunk", 8), ("BKS", 32), ("BKS", 128),
           ("BKS_du", 64), ("warps_rank1", 8), ("BV_rank1", 32)]


def with_change(fields):
    """Install ``fields`` (``{field: value}``) in the launches; returns an undo callable."""
    real = fused.launch_shape

    def patched(*args, **kwargs):     # launch_shape(K, V, C, fp32=...)
        return dataclasses.replace(real(*args, **kwargs), **fields)

    fused.launch_shape = fused_bwd.launch_shape = delta.launch_shape = patched   # each imported it by name

    def undo():
        fused.launch_shape = fused_bwd.launch_shape = delta.launch_shape = real
    return undo


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="8,2048,16,128")
    ap.add_argument("--methods", nargs="*", default=["mamba2", "gated_deltanet"])
    ap.add_argument("--changes", nargs="*", default=None,
                    help="field=value pairs to try instead of CHANGES, e.g. warps_state_lr=4 BV=64; "
                         "'+' joins fields changed together, e.g. BKS=128+BV_dqdw=64+warps_chunk=8")
    # OLSM_MATRIX_* set in the shell do not reach the calls: profile_ops sets every switch from the
    # variant (bench_matrix.set_variant), so a code path is chosen here
    ap.add_argument("--variant", default="new", type=BM.variant_name,
                    help="bench_matrix variant to sweep under, e.g. stages4 or walk+stages2")
    args = ap.parse_args()
    changes = ([{f: v} for f, v in CHANGES] if args.changes is None else
               [{kv.split("=")[0]: int(kv.split("=")[1]) for kv in c.split("+")} for c in args.changes])
    shape = tuple(int(p) for p in args.shape.split(","))
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, shape {shape} bf16, "
          f"variant {args.variant}")
    print(f"default: {fused.launch_shape(shape[3], shape[3], 64)}")
    for method in args.methods:
        times = profile_ops.kernel_times(method, shape, args.variant)
        base = {k: ms for k, (_, ms) in times.items() if not k.startswith("void")}
        rows = {k: {} for k in base}
        for fields in changes:
            label = "+".join(f"{f}={v}" for f, v in fields.items())
            undo = with_change(fields)
            try:
                got = profile_ops.kernel_times(method, shape, args.variant)
            except Exception as err:  # noqa: BLE001 - a config that does not fit is a result too
                print(f"  {method} {label}: {type(err).__name__}: {str(err)[:100]}")
                got = {}
            finally:
                undo()
            for k in rows:
                if k not in got:     # did not launch: OutOfResources sent the call to another path
                    rows[k][label] = float("inf")
                elif abs(got[k][1] - base[k]) > 0.02 * base[k]:
                    rows[k][label] = got[k][1]
        print(f"\n## {method}: default ms, then the changes that moved a kernel by more than 2 %")
        for k, ms in sorted(base.items(), key=lambda kv: -kv[1]):
            moved = ", ".join(f"{c} {t:.3f}" for c, t in sorted(rows[k].items(), key=lambda kv: kv[1]))
            print(f"- {k}: {ms:.3f} | {moved}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
