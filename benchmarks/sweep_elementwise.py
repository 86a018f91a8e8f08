"""Sweep the block-parallel elementwise scan's tiles (BT, BV, warps) on a GPU.

The forward and the backward kernel have separate tiles (``olsm.kernels.elementwise.config``).
The forward tiles are timed forward-only; the backward tiles are timed forward+backward with
the forward at its default tile, and the backward's time is the difference. Both at the
Longhorn paper's scan shapes (N = 16, E = 1536, bf16; longhorn_diag, or mamba1 with ``--recurrence``) with many programs
(B = 8, T = 2048) and with few (B = 2, T = 8192). Registers and spills of each compiled
kernel are read from Triton's compiled-kernel handle where this Triton exposes them.

Compilation dominates a sweep: ``--warm I/N`` compiles (without timing) the I-th of N shards
of the configurations into Triton's on-disk cache, so several processes can compile in
parallel before the one timing process runs::

    for i in 0 1 2 3 4 5; do python benchmarks/sweep_elementwise.py --warm $i/6 & done; wait
    python -u benchmarks/sweep_elementwise.py --out $OUT

Writes ``<stem>.md`` (every configuration) and ``<stem>.json`` (the best forward and backward
tile per shape, which ``bench_elementwise.py --tiles`` reads).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_elementwise import bench_ms, make_inputs, olsm_triton  # noqa: E402

SHAPES = [(768, 8, 2048), (768, 2, 8192)]  # (d_model, B, T)
K = 16


def configs(kind: str, grid: str = ""):
    """Tiles worth timing, as (BT, BV, warps, prefetch, maxnreg).

    ``grid`` (``--grid``) replaces the defaults below by an explicit product, e.g.
    ``"bt=16,32,64 bv=1,2 warps=1"`` (keys bt, bv, warps, prefetch, maxnreg; 0 = no cap).

    Forward: 0.5-16 K tile elements, 8-64 per thread. Backward (register-bound: it keeps many
    tiles alive): small tiles on 1-2 warps, with and without the block prefetch, with and
    without a register cap (more programs per SM against spills).
    """
    out = []
    if grid:
        axes = dict(bt=[8], bv=[4], warps=[1], prefetch=[1], maxnreg=[0])
        for item in grid.split():
            key, vals = item.split("=")
            axes[key] = [int(x) for x in vals.split(",")]
        for bt, bv, nw, pf, mr in itertools.product(*(axes[k] for k in ("bt", "bv", "warps", "prefetch", "maxnreg"))):
            out.append((bt, bv, nw, pf, mr or None))
        return out
    if kind == "fwd":
        for bt, bv, nw in itertools.product((8, 16, 32, 64), (4, 8, 16, 32, 64), (1, 2, 4, 8)):
            elems = bt * K * bv
            if 512 <= elems <= 16384 and 8 <= elems // (32 * nw) <= 64:
                out.append((bt, bv, nw, 1, None))
    else:
        for bt, bv, nw, pf, mr in itertools.product((4, 8), (2, 4, 8), (1, 2), (0, 1), (None, 128, 168)):
            if bt * K * bv // (32 * nw) >= 4:
                out.append((bt, bv, nw, pf, mr))
    return out


def compiled_kernels(jitfn) -> dict:
    """id -> compiled variant of ``jitfn`` in this process (empty where Triton hides them)."""
    found = {}
    try:
        for entry in getattr(jitfn, "device_caches", {}).values():
            cache = entry[0] if isinstance(entry, tuple) else entry
            found.update({id(k): k for k in cache.values() if hasattr(k, "n_spills")})
    except Exception:  # an internal API: a missing figure is no failure
        pass
    return found


def run_config(rec, inputs, kind, tile):
    """Closures for one tile: forward-only for ``fwd``, forward+backward for ``bwd``."""
    bt, bv, nw, pf, mr = tile
    pair = lambda x, d=None: (x, d) if kind == "fwd" else (d, x)  # noqa: E731
    fwd, fb = olsm_triton(rec, *inputs, block_t=pair(bt), block_v=pair(bv), num_warps=pair(nw),
                          prefetch=pair(pf, 1), max_registers=pair(mr))
    return fwd if kind == "fwd" else fb


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--stem", default="elementwise_sweep")
    ap.add_argument("--warm", default=None, help="I/N: only compile shard I of N")
    ap.add_argument("--kinds", default="fwd,bwd", help="which kernels to sweep (fwd, bwd or both)")
    ap.add_argument("--recurrence", default="longhorn_diag", choices=("longhorn_diag", "mamba1"),
                    help="the catalogue member whose generated kernels are swept")
    ap.add_argument("--grid", default="", help='explicit grid, e.g. "bt=16,32 bv=1,2 warps=1" (see configs)')
    args = ap.parse_args()

    import olsm
    from olsm.kernels.elementwise import compile_recurrence
    from olsm import objectives

    name = args.recurrence
    rec = olsm.derive(getattr(objectives, name))
    jobs = [(kind, t) for kind in args.kinds.split(",") for t in configs(kind, args.grid)]
    if args.warm:
        i, n = (int(x) for x in args.warm.split("/"))
        d, B, T = SHAPES[0]
        inputs = make_inputs(name, B, 256, 2 * d)  # compiling needs no long sequence
        for kind, tile in jobs[i::n]:
            try:
                run_config(rec, inputs, kind, tile)()
            except Exception as e:  # out of resources: recorded by the timing run
                print(f"{kind} {tile}: {type(e).__name__}", flush=True)
        # the kernels are in Triton's disk cache; skip interpreter teardown, where compile
        # worker threads have aborted the process ("terminate called without an active exception")
        sys.stdout.flush()
        os._exit(0)

    from tqdm import tqdm

    rows, best, stats = [], {}, {}
    kinds = args.kinds.split(",")
    for d, B, T in SHAPES:
        inputs = make_inputs(name, B, T, 2 * d)
        fwd_default = bench_ms(olsm_triton(rec, *inputs)[0])
        for kind, tile in tqdm([j for j in jobs if j[0] in kinds], desc=f"B={B} T={T}"):
            _, mod = compile_recurrence(rec, (tile[3], 1) if kind == "fwd" else (1, tile[3]))
            kern = mod.fwd_kernel if kind == "fwd" else mod.bwd_kernel
            before = compiled_kernels(kern)
            try:
                ms = bench_ms(run_config(rec, inputs, kind, tile))
                if kind == "bwd":
                    ms -= fwd_default
            except Exception as e:
                ms, stats[(kind, tile)] = float("nan"), type(e).__name__
            new = [k for i, k in compiled_kernels(kern).items() if i not in before]
            if new:  # compiled (or loaded from the disk cache) by this configuration
                stats[(kind, tile)] = "/".join(f"{k.n_regs}/{k.n_spills}" for k in new)
            st = stats.get((kind, tile), "")
            rows.append(dict(B=B, T=T, kind=kind, BT=tile[0], BV=tile[1], warps=tile[2], prefetch=tile[3],
                             maxnreg=tile[4], ms=ms, regs_spills=st))
            print(f"  B={B} T={T} {kind} {tile}: {ms:.3f} ms {st}", flush=True)
        for kind in kinds:
            ok = [r for r in rows if r["B"] == B and r["kind"] == kind and r["ms"] == r["ms"]]
            b = min(ok, key=lambda r: r["ms"])
            best[f"{B},{T},{kind}"] = {key: b[key] for key in ("BT", "BV", "warps", "prefetch", "maxnreg", "ms")}
        del inputs
        torch.cuda.empty_cache()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stem}.json").write_text(json.dumps(best, indent=1))
    lines = [f"# Elementwise scan tile sweep ({torch.cuda.get_device_name()})", "",
             f"{name}, N = 16, E = 1536, bf16; fwd: forward ms; bwd: forward+backward ms minus the "
             "default forward's. regs/spills per thread of the compiled kernel.", "",
             "| B | T | kernel | BT | BV | warps | prefetch | maxnreg | ms | regs/spills |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["B"], r["kind"], r["ms"] if r["ms"] == r["ms"] else 1e9)):
        lines.append(f"| {r['B']} | {r['T']} | {r['kind']} | {r['BT']} | {r['BV']} | {r['warps']} | "
                     f"{r['prefetch']} | {r['maxnreg']} | {r['ms']:.3f} | {r['regs_spills']} |")
    lines += ["", "best: " + json.dumps(best)]
    (out / f"{args.stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:8]) + "\nbest: " + json.dumps(best))


if __name__ == "__main__":
    main()
