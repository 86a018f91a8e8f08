"""Quick A/B of the opt-in matrix-kernel switches on the GPU, without FLA (whose autotuning costs
minutes): median ms of ours per variant at the shapes each switch is aimed at, printed as each
finishes, so a cut-off call still reports what it reached. The full comparison with FLA is
``bench_matrix.py --variants ...``.

    python -u benchmarks/quick_ab.py            (GPU; on a CPU it runs each case once, tiny, in the
                                                 interpreter, to check the calls)
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


PLAN = [  # (label, method, shape, switches, backward)
    ("la walk fwd", "linear_attention", (1, 32768, 16, 128), {"OLSM_MATRIX_STATE": "walk"}, False),
    ("la split fwd", "linear_attention", (1, 32768, 16, 128), {"OLSM_MATRIX_STATE": "split"}, False),
    ("dn new fwd", "deltanet", (8, 2048, 16, 128), {}, False),
    ("dn rows16 fwd", "deltanet", (8, 2048, 16, 128), {"OLSM_MATRIX_INVERSE": "rows16"}, False),
    ("dn new fwdbwd", "deltanet", (8, 2048, 16, 128), {}, True),
    ("dn keep fwdbwd", "deltanet", (8, 2048, 16, 128), {"OLSM_MATRIX_DELTA_SAVE": "keep"}, True),
    ("lh new fwdbwd", "longhorn", (8, 2048, 16, 128), {}, True),
    ("dn rows4 fwd", "deltanet", (8, 2048, 16, 128), {"OLSM_MATRIX_INVERSE": "rows4"}, False),
    ("la split fwdbwd", "linear_attention", (1, 32768, 16, 128), {"OLSM_MATRIX_STATE": "split"}, True),
    ("la walk fwdbwd", "linear_attention", (1, 32768, 16, 128), {"OLSM_MATRIX_STATE": "walk"}, True),
    # never timed next to FLA yet (per-key decay and the general pair run the general path)
    ("gla fwdbwd", "gla", (8, 2048, 16, 128), {}, True),
    ("dplr fwdbwd", "dplr", (8, 2048, 16, 128), {}, True),
]


def main():
    saved = dict(os.environ)
    try:
        run()
    finally:    # the switches are process-wide: leave the environment as found
        os.environ.clear()
        os.environ.update(saved)


def run():
    t0, cache = time.time(), {}
    for label, method, shape, env, backward in PLAN:
        if small:
            shape = (1, 70, 2, 16)
        os.environ.update(dict(BM.ENV_DEFAULTS, **env))
        if shape not in cache:
            cache.clear()
            if dev == "cuda":
                torch.cuda.empty_cache()
            cache[shape] = BM.make_inputs(*shape, dtype=torch.float32 if small else torch.bfloat16, device=dev)
        ms = t(lambda z: BM.ours(method, z, km, True), cache[shape], backward)
        print(f"{label:18s} {shape} {ms if isinstance(ms, str) else round(ms, 3)} ms  [{time.time() - t0:.0f} s]",
              flush=True)


if __name__ == "__main__":
    main()
