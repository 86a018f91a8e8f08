"""Quick A/B of the opt-in matrix-kernel switches on the GPU, without FLA (whose autotuning costs
minutes): median ms of ours per variant at the shapes each switch is aimed at, printed as each
finishes, so a cut-off call still reports what it reached. The full comparison with FLA is
``bench_matrix.py --variants ...``.

    python -u benchmarks/quick_ab.py            (GPU; on a CPU it runs each case once, tiny, in the
                                                 interpreter, to check the calls)
    python -u benchmarks/quick_ab.py deltanet:recompute+fp32dots:bwd linear_attention:walk:fwd:1,32768,16,128
                                                (a plan of its own: method:variant:fwd|bwd[:B,T,H,D];
                                                 variants as bench_matrix's, joined with +)
"""
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_matrix as BM  # noqa: E402

dev = "cuda" if torch.cuda.is_available() else "cpu"
small = dev == "cpu"
km = BM.import_kernels()


def t(fn, x, backward):
    """Median ms (GPU), or one call (CPU)."""
    if not small:
        return BM.bench(fn, x, backward)
    o = fn(x)
    if backward:
        o.float().sum().backward()
    return 0.0


LA, DN = (1, 32768, 16, 128), (8, 2048, 16, 128)     # the shapes the switches aim at
PLAN = [  # (method, shape, variant of bench_matrix.VARIANTS, backward)
    ("linear_attention", LA, "new", False), ("linear_attention", LA, "walk", False),
    ("deltanet", DN, "new", False), ("deltanet", DN, "levels2", False), ("deltanet", DN, "fp32dots", False),
    ("deltanet", DN, "new", True), ("deltanet", DN, "recompute", True), ("deltanet", DN, "run8", True),
    ("longhorn", DN, "new", True),
    ("linear_attention", LA, "new", True), ("linear_attention", LA, "walk", True),
    # GLA (fused per-key path since run 10) and the RWKV-7 form (general path)
    ("gla", DN, "new", True), ("dplr", DN, "new", True),
]


def parse_plan(args):
    """``method:variant:fwd|bwd[:B,T,H,D]`` items -> PLAN rows (shape DN unless given)."""
    plan = []
    for item in args:
        method, variant, mode, *shape = item.split(":")
        BM.variant_name(variant)
        if mode not in ("fwd", "bwd"):
            raise SystemExit(f"{item}: the third field is fwd or bwd")
        plan.append((method, tuple(int(n) for n in shape[0].split(",")) if shape else DN, variant, mode == "bwd"))
    return plan


def main(argv=()):
    global PLAN
    if argv:
        PLAN = parse_plan(argv)
    saved = dict(os.environ)
    try:
        run()
    finally:    # the switches are process-wide: leave the environment as found
        os.environ.clear()
        os.environ.update(saved)


def run():
    t0, cache = time.time(), {}
    for method, shape, variant, backward in PLAN:
        label = f"{method} {variant} {'fwd+bwd' if backward else 'fwd'}"
        if small:
            shape = (1, 70, 2, 16)
        delta = BM.set_variant(variant)
        if shape not in cache:
            cache.clear()
            if dev == "cuda":
                torch.cuda.empty_cache()
            cache[shape] = BM.make_inputs(*shape, dtype=torch.float32 if small else torch.bfloat16, device=dev)
        ms = t(lambda z: BM.ours(method, z, km, delta), cache[shape], backward)
        print(f"{label:32s} {shape} {ms if isinstance(ms, str) else round(ms, 3)} ms  [{time.time() - t0:.0f} s]",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
