"""Benchmark the generated elementwise-gate Triton scan (Longhorn diagonal, Mamba-1) on a GPU.

Shapes are the Longhorn/Mamba block's scan: one head, value dimension E = 2·d_model (each
channel is a value column), key dimension N = 16 (the state per channel), for d_model 768 and
1024, at T = 2048 (B = 8) and T = 8192 (B = 2), bfloat16 inputs.

Compared, in one process:

* ``olsm-triton``: :func:`olsm.kernels.elementwise.elementwise_scan` (kernels printed from
  ``olsm.derive(longhorn_diag)`` / ``olsm.derive(mamba1)``);
* ``olsm-torch``: the chunked torch backend (``rec(..., backend="torch")``), which
  materialises G ``[B, T, H, K, V]``;
* ``olsm-triton-swept``: the same kernels at the best tiles of ``sweep_elementwise.py``
  (``--tiles``), to show what the default tile choice leaves;
* ``olsm-triton-classic`` (``--classic``): the classic kernel template (``OLSM_ELEMENTWISE_LEAN=0``,
  the way back from the default lean one: masked blocks, ``tl.exp``), in the same process;
* ``olsm-triton-<slab>`` (``--slabs``): the backward's block-entering states in a global
  scratch slab (``global``) or in registers (``registers``, checkpoint every 128 tokens;
  ``registers:S`` with S segments per checkpoint, every 128·S tokens), e.g. ``--slabs
  global,registers,registers:8,registers:16`` A/B-times the slabs (the plain ``olsm-triton``
  row is the default, whichever slab that is);
* ``longhorn-cuda`` (longhorn_diag) and ``mamba-ssm`` (mamba1): the Longhorn paper's CUDA
  scan and mamba_ssm's ``selective_scan_cuda``, built on the GPU machine from sources carried
  in ``--longhorn-src`` / ``--mamba-src`` (never committed; :mod:`peers_elementwise`, DESIGN
  §7), each in its own channels-first layout.

Reported per case: median forward and forward+backward milliseconds, the peak extra memory
of forward+backward (MiB above the inputs: output, checkpoints, slab, gradients), and the
forward I/O floor (bytes of q, k, v, coefficients and o over
the measured device-to-device copy bandwidth).

Usage (the peer builds take minutes: start them first, in the background)::

    python benchmarks/bench_elementwise.py --build-only longhorn &
    python benchmarks/bench_elementwise.py --build-only mamba &
    for i in 0 1 2 3 4 5 6 7; do python benchmarks/bench_elementwise.py --warm $i/8 [--slabs ...] & done; wait
    python -u benchmarks/bench_elementwise.py --out benchmarks/results --peer-wait 400 \
        [--tiles benchmarks/results/elementwise_sweep.json] [--slabs global,registers] [--quick]

(the optional ``--warm`` shards compile our kernels into Triton's disk cache in parallel).
"""
from __future__ import annotations

import argparse
import csv
import functools
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

N_STATE = 16
#: largest relative difference between a peer and us (output and each gradient, bf16) that
#: still counts as the same function
PARITY_TOL = 5e-2
CASES = [  # (d_model, B, T)
    (768, 8, 2048),
    (1024, 8, 2048),
    (768, 2, 8192),
    (1024, 2, 8192),
]


# ------------------------------------------------------------------------------ timing
def bench_ms(fn, *, slow_ms: float = 30.0) -> float:
    """Median milliseconds of ``fn()``: do_bench for fast functions, 3 event-timed runs else."""
    import triton

    fn()  # compile / warm caches
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = (time.perf_counter() - t0) * 1e3
    if once < slow_ms:
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = []
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def peak_extra_mb(fn) -> float:
    """Peak memory ``fn()`` allocates on top of what is already allocated, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth_tbs() -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), in TB/s."""
    import triton

    x = torch.empty(2**28, dtype=torch.float32, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return 2 * x.numel() * 4 / (ms * 1e-3) / 1e12


# ------------------------------------------------------------------------------ inputs
def make_inputs(name: str, B: int, T: int, E: int, dtype=torch.bfloat16, seed: int = 0, device: str = "cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    q = rn(B, T, 1, N_STATE).to(dtype)
    k = (rn(B, T, 1, N_STATE) / N_STATE**0.5).to(dtype)
    v = rn(B, T, 1, E).to(dtype)
    if name == "longhorn_diag":
        coefs = {"beta": torch.sigmoid(rn(B, T, 1, E)).to(dtype)}
    else:
        dt = torch.nn.functional.softplus(rn(B, T, 1, E) - 4.0).to(dtype)
        A = -torch.arange(1, N_STATE + 1, device=device, dtype=torch.float32).repeat(1, E, 1)
        coefs = {"dt": dt, "A": A}
    D = torch.ones(1, E, device=device)
    return q, k, v, coefs, D


def io_bytes_fwd(name: str, B: int, T: int, E: int, elem: int = 2) -> int:
    """Bytes the forward must move at least: read q, k, v, the coefficient; write o."""
    return B * T * (2 * N_STATE + 3 * E) * elem


# ------------------------------------------------------------------------------ runners
def olsm_triton(rec, q, k, v, coefs, D, block_t=None, block_v=None, num_warps=None, prefetch=None,
                max_registers=None, chunk_size=64, slab=None, slab_segments=None, seq_split=None, lean=None,
                slab_slots=None):
    from olsm.kernels.elementwise import elementwise_scan

    leaves = [q, k, v, D, *coefs.values()]
    opts = dict(scale=1.0, block_t=block_t, block_v=block_v, num_warps=num_warps, prefetch=prefetch,
                max_registers=max_registers, chunk_size=chunk_size, slab=slab, slab_segments=slab_segments,
                seq_split=seq_split, lean=lean, slab_slots=slab_slots)

    def fwd():
        with torch.no_grad():
            return elementwise_scan(rec, q, k, v, coefs, D=D, **opts)

    def fwdbwd():
        xs = [x.detach().requires_grad_(True) for x in leaves]
        c = dict(zip(coefs, xs[4:]))
        o, _ = elementwise_scan(rec, xs[0], xs[1], xs[2], c, D=xs[3], **opts)
        torch.autograd.grad(o, xs, o)  # any cotangent of o's shape; o itself costs no alloc

    return fwd, fwdbwd


def olsm_torch(rec, q, k, v, coefs, D):
    leaves = [q, k, v, D, *coefs.values()]

    def run(q, k, v, D, c):
        o, _ = rec(q, k, v, scale=1.0, backend="torch", chunk_size=64, check_inputs=False, **c)
        return o + (D[None, None] * v).to(o.dtype)

    def fwd():
        with torch.no_grad():
            return run(q, k, v, D, coefs)

    def fwdbwd():
        xs = [x.detach().requires_grad_(True) for x in leaves]
        o = run(*xs[:4], dict(zip(coefs, xs[4:])))
        torch.autograd.grad(o, xs, o, allow_unused=True)

    return fwd, fwdbwd


# ------------------------------------------------------------------------------ report
def write_reports(rows, meta, out: Path, stem: str):
    out.mkdir(parents=True, exist_ok=True)
    keys = ["recurrence", "d_model", "E", "B", "T", "impl", "fwd_ms", "fwdbwd_ms", "peak_mb", "io_floor_fwd_ms", "note"]
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})
    fmt = lambda x: f"{x:.3f}" if isinstance(x, float) else str(x)  # noqa: E731
    lines = [f"# Elementwise-gate scan benchmark ({meta['device']})", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "| recurrence | d_model | E | B | T | impl | fwd ms | fwd+bwd ms | peak MiB | I/O floor fwd ms | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cases = sorted({(r["recurrence"], r["d_model"], r["B"], r["T"]) for r in rows}, key=str)
        impls = sorted({r["impl"] for r in rows})
        fig, axes = plt.subplots(1, 2, figsize=(14, 5))
        for ax, key, title in ((axes[0], "fwd_ms", "forward"), (axes[1], "fwdbwd_ms", "forward + backward")):
            width = 0.8 / max(1, len(impls))
            for i, impl in enumerate(impls):
                ys = []
                for c in cases:
                    m = [r for r in rows if (r["recurrence"], r["d_model"], r["B"], r["T"]) == c and r["impl"] == impl]
                    ys.append(m[0][key] if m and isinstance(m[0].get(key), float) else float("nan"))
                ax.bar([j + i * width for j in range(len(cases))], ys, width, label=impl)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
            ax.set_xticklabels([f"{c[0]}\nD={c[1]} B={c[2]}\nT={c[3]}" for c in cases], fontsize=7)
            ax.set_yscale("log")
            ax.set_ylabel("median ms (log)")
            ax.set_title(f"{title}, {meta['device']}, bf16")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png", dpi=110)
    except Exception as e:  # plotting is a convenience, never a failure
        print(f"plot skipped: {e}", file=sys.stderr)


# ------------------------------------------------------------------------------ main
def slab_variants(spec: str):
    """``--slabs`` as ``(impl name, slab, segments)``: ``global``, ``registers`` or
    ``registers:S`` (S segments per checkpoint interval)."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        slab, _, seg = item.partition(":")
        if slab not in ("global", "registers"):
            raise SystemExit(f"--slabs: unknown slab {slab!r} (global, registers, registers:S)")
        name = "olsm-triton-" + ("regs" if slab == "registers" else "global") + (f"-seg{int(seg)}" if seg else "")
        out.append((name, slab, int(seg) if seg else None))
    return out


def bwd_tile_variants(spec: str):
    """``--bwd-tiles`` as ``(impl name, olsm_triton keywords)``: items ``BT:BV:W:S`` (the backward's
    token block, value slice, warps and register-slab slots, so one checkpoint every ``BT · S``
    tokens and a single replay of it), separated by commas."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        try:
            bt, bv, w, s = (int(x) for x in item.split(":"))
        except ValueError:
            raise SystemExit(f"--bwd-tiles item {item!r} is not BT:BV:W:S") from None
        out.append((f"olsm-triton-bwd{bt}x{bv}w{w}s{s}",
                    dict(block_t=(None, bt), block_v=(None, bv), num_warps=(None, w), slab="registers",
                         slab_slots=s, slab_segments=1)))
    return out


def parse_split(item: str):
    """``--seq-splits`` item -> ``seq_split``: ``4`` both kernels, ``f4`` / ``b4`` one of them,
    ``f2b4`` each its own."""
    m = re.fullmatch(r"(\d+)|(?:f(\d+))?(?:b(\d+))?", item)
    if not m or not item:
        raise SystemExit(f"--seq-splits item {item!r} is not S, fS, bS or fAbB")
    if m.group(1):
        return int(m.group(1))
    return tuple(int(g) if g else None for g in m.group(2, 3))


def checkpoint_note(rec, q, k, v, coefs, D, **opts) -> str:
    """The slab and checkpoint interval the call with ``opts`` (olsm_triton's) takes, as planned
    by the launcher (``slab="auto"`` resolved), with its backward tile."""
    from olsm.kernels.elementwise.scan import launch_plan

    opts = {key: val for key, val in opts.items() if val is not None}
    cfg = launch_plan(rec, q, k, v, coefs, D=D, need_grad=True, **opts).cfg
    stored = -(-q.shape[1] // cfg.C) - 1
    return (f"slab={cfg.slab}, C={cfg.C} ({stored} checkpoints/seq), slots={cfg.slots}, segments={cfg.segments}, "
            f"bwd [{cfg.bwd.BT},{cfg.BK},{cfg.bwd.BV}] on {cfg.bwd.num_warps} warp(s)")


def swept_tiles(path: str, B: int, T: int):
    """``(block_t, block_v, num_warps, prefetch, max_registers)`` (forward, backward) pairs from a
    sweep's JSON for the nearest shape (a kernel the sweep left out keeps its default), or None."""
    if not path or not Path(path).exists():
        return None
    import json

    best = json.loads(Path(path).read_text())
    shapes = {tuple(int(x) for x in key.split(",")[:2]) for key in best}
    b, t = min(shapes, key=lambda s: abs(s[0] - B) + abs(s[1] - T) / 1024)
    f, g = best.get(f"{b},{t},fwd", {}), best[f"{b},{t},bwd"]
    pair = lambda key, dflt=None: (f.get(key, dflt), g.get(key, dflt))  # noqa: E731
    return pair("BT"), pair("BV"), pair("warps"), pair("prefetch", 1), pair("maxnreg")


def peer(name, build, src: Path, build_dir: Path, wait: float, meta):
    """Load a peer extension (built here, or by a ``--build-only`` process); None + reason if not."""
    marker = build_dir / "BUILD_OK"
    if not src.exists():
        meta[name] = f"not timed: sources not found at {src}"
        return None
    if wait > 0:
        deadline = time.time() + wait
        while not marker.exists() and time.time() < deadline:
            time.sleep(2)
        if not marker.exists():
            meta[name] = f"not timed: not built within the {wait:.0f} s wait (build still running)"
            return None
    try:
        t0 = time.time()
        ext = build(src, build_dir)
        built = marker.read_text().strip() if marker.exists() else "this process"
        meta[name] = f"loaded in {time.time() - t0:.0f}s (build: {built})"
        return ext
    except Exception as e:
        meta[name] = f"not timed: {type(e).__name__}: {str(e)[-300:]}"
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--stem", default="elementwise_h200")
    ap.add_argument("--longhorn-src", default=".carry/longhorn_ss")
    ap.add_argument("--mamba-src", default=".carry/mamba_ss")
    ap.add_argument("--build-root", default="/tmp/peer_build")
    ap.add_argument("--build-only", choices=["longhorn", "mamba"], default=None,
                    help="only compile one peer extension (run in the background)")
    ap.add_argument("--peer-wait", type=float, default=0.0,
                    help="seconds to wait for --build-only processes to finish before timing the "
                         "peers; 0 builds in this process")
    ap.add_argument("--tiles", default=None, help="sweep_elementwise.py's JSON: also time its best tiles")
    ap.add_argument("--chunk-sizes", default="",
                    help="comma-separated checkpoint intervals to also time on the first shape "
                         "(memory of the checkpoints against the backward's replay)")
    ap.add_argument("--slabs", default="",
                    help="comma-separated backward slabs to also time: global, registers, registers:S "
                         "(S segments per checkpoint interval)")
    ap.add_argument("--bwd-tiles", default="",
                    help="comma-separated backward tiles also timed, BT:BV:W:S (tokens per block, value "
                         "slice, warps, register-slab slots: a checkpoint every BT·S tokens, one replay)")
    ap.add_argument("--seq-splits", default="",
                    help="comma-separated splits along the sequence also timed: S (both kernels in S "
                         "segments), fS (the forward only), bS (the backward only), fAbB (A and B); rows "
                         "olsm-triton-split<item>; the plain row is the default")
    ap.add_argument("--recurrences", default="longhorn_diag,mamba1", help="comma-separated subset to time")
    ap.add_argument("--classic", action="store_true",
                    help="also time the classic kernel template (olsm-triton-classic; OLSM_ELEMENTWISE_LEAN=0)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--quick", action="store_true", help="first case only")
    ap.add_argument("--warm", default=None,
                    help="I/N: only compile shard I of N of our kernels (default and --slabs, every "
                         "case) by one forward+backward at B = 1, no timing; run N in parallel first")
    args = ap.parse_args()

    from peers_elementwise import build_longhorn, build_mamba, grad_parity, longhorn_cuda, mamba_cuda

    builds = {"longhorn": (build_longhorn, Path(args.longhorn_src)), "mamba": (build_mamba, Path(args.mamba_src))}
    if args.build_only:
        build, src = builds[args.build_only]
        t0 = time.time()
        build(src, Path(args.build_root, args.build_only))
        # the marker, not torch's lock file, tells the benchmark process the build is done:
        # calling load() while another process builds blocks on that lock
        Path(args.build_root, args.build_only, "BUILD_OK").write_text(f"{time.time() - t0:.0f}s\n")
        print(f"{args.build_only} build ok in {time.time() - t0:.0f}s")
        return

    from tqdm import tqdm

    import olsm
    import triton
    from olsm.objectives import longhorn_diag, mamba1

    assert torch.cuda.is_available(), "this benchmark needs a GPU"
    wanted = set(args.recurrences.split(","))
    recs = {n: olsm.derive(o) for n, o in (("longhorn_diag", longhorn_diag), ("mamba1", mamba1)) if n in wanted}
    variants = slab_variants(args.slabs)
    tile_variants = bwd_tile_variants(args.bwd_tiles)
    if args.warm:
        # the kernels' constexprs depend on E, (through C) on T, and (through the forward's
        # few-programs block, config.FEW_PROGRAMS_PER_SM) on B: each case at its own shape
        i, n = (int(x) for x in args.warm.split("/"))
        classic = [("olsm-triton-classic", dict(lean=False))] if args.classic else []
        shard = [(name, d, B, T, v) for name in recs for (d, B, T) in (CASES[:1] if args.quick else CASES)
                 for v in [("olsm-triton", dict())] + [(x[0], dict(slab=x[1], slab_segments=x[2])) for x in variants]
                 + classic + tile_variants][i::n]
        for name, d, B, T, (_, kw) in shard:
            q, k, v, coefs, D = make_inputs(name, B, T, 2 * d)
            olsm_triton(recs[name], q, k, v, coefs, D, **kw)[1]()
        torch.cuda.synchronize()
        print(f"warm {args.warm}: {len(shard)} compiled", flush=True)
        # the kernels are in Triton's disk cache; skip interpreter teardown, where a compile
        # worker thread aborted one warm-up process in run 18 (as in sweep_elementwise.py)
        os._exit(0)
        return
    bw = copy_bandwidth_tbs()
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy bandwidth (TB/s, read+write)": f"{bw:.2f}",
        "dtype": "bfloat16 inputs, float32 state/accumulation",
        "timing": "median ms (triton.testing.do_bench; 3 CUDA-event runs when > 30 ms)",
        "olsm-triton": "tiles chosen by choose_config; olsm-triton-swept: the sweep's best tiles (--tiles)",
        "peak MiB": "max_memory_allocated during forward+backward minus what was allocated before",
    }
    print(meta, flush=True)
    rows = []

    def measure(row, fwd, fb):
        try:
            row["fwd_ms"] = bench_ms(fwd)
            if row["fwd_ms"] > 2000:  # the materialised-G torch path at long T: enough said
                row["note"] = "fwd+bwd skipped (fwd > 2 s)"
            else:
                row["fwdbwd_ms"] = bench_ms(fb)
                row["peak_mb"] = peak_extra_mb(fb)
        except torch.OutOfMemoryError:
            row["note"] = "out of memory"
            torch.cuda.empty_cache()
        rows.append(row)
        print(f"  {row['recurrence']} D={row['d_model']} B={row['B']} T={row['T']} {row['impl']}: "
              f"fwd {row.get('fwd_ms', float('nan')):.3f} ms, fwd+bwd {row.get('fwdbwd_ms', float('nan')):.3f} ms, "
              f"peak {row.get('peak_mb', float('nan')):.1f} MiB, floor {row['io_floor_fwd_ms']:.3f} ms"
              f"{'  [' + row['note'] + ']' if row.get('note') else ''}", flush=True)
        write_reports(rows, meta, Path(args.out), args.stem)  # partial results survive a timeout

    # -- 1. ours ---------------------------------------------------------------------------
    cases = CASES[:1] if args.quick else CASES
    jobs = [(name, d, B, T) for name in recs for (d, B, T) in cases]
    for name, d, B, T in tqdm(jobs, desc="cases"):
        E = 2 * d
        q, k, v, coefs, D = make_inputs(name, B, T, E)
        floor = io_bytes_fwd(name, B, T, E) / (bw * 1e12) * 1e3
        base = dict(recurrence=name, d_model=d, E=E, B=B, T=T, io_floor_fwd_ms=floor)
        note = functools.partial(checkpoint_note, recs[name], q, k, v, coefs, D)
        measure(dict(base, impl="olsm-triton", note=note()),
                *olsm_triton(recs[name], q, k, v, coefs, D))
        for impl, slab, seg in variants:
            measure(dict(base, impl=impl, note=note(slab=slab, slab_segments=seg)),
                    *olsm_triton(recs[name], q, k, v, coefs, D, slab=slab, slab_segments=seg))
        for impl, kw in tile_variants:
            measure(dict(base, impl=impl, note=note(**kw)),
                    *olsm_triton(recs[name], q, k, v, coefs, D, **kw))
        if args.classic:
            measure(dict(base, impl="olsm-triton-classic", note="classic template (OLSM_ELEMENTWISE_LEAN=0)"),
                    *olsm_triton(recs[name], q, k, v, coefs, D, lean=False))
        for item in filter(None, args.seq_splits.split(",")):
            split = parse_split(item)
            measure(dict(base, impl=f"olsm-triton-split{item}", note=f"seq_split={split}"),
                    *olsm_triton(recs[name], q, k, v, coefs, D, seq_split=split))
        tiles = swept_tiles(args.tiles, B, T)
        if tiles is not None:
            measure(dict(base, impl="olsm-triton-swept",
                         note=f"BT, BV, warps, prefetch, maxnreg (fwd, bwd) = {tiles}"),
                    *olsm_triton(recs[name], q, k, v, coefs, D, *tiles))
        if (d, B, T) == cases[0]:
            for c in filter(None, args.chunk_sizes.split(",")):
                measure(dict(base, impl=f"olsm-triton-C{int(c)}", note=f"chunk_size={int(c)}"),
                        *olsm_triton(recs[name], q, k, v, coefs, D, chunk_size=int(c)))
        if not args.no_torch:
            measure(dict(base, impl="olsm-torch"), *olsm_torch(recs[name], q, k, v, coefs, D))
        del q, k, v, coefs, D
        torch.cuda.empty_cache()

    # -- 2. the CUDA peers, last: their builds may still be running --------------------------
    peers = [("longhorn-cuda", "longhorn_diag", "longhorn", longhorn_cuda),
             ("mamba-ssm", "mamba1", "mamba", mamba_cuda)]
    for impl, name, key, runner in peers:
        if name not in recs:
            continue
        build, src = builds[key]
        ext = peer(impl, build, src, Path(args.build_root, key), args.peer_wait, meta)
        print(f"{impl}: {meta[impl]}", flush=True)
        if ext is None:
            continue
        # the same function, checked before it is timed: output and every gradient
        note = ""
        try:
            rels = grad_parity(recs[name], runner, ext)
            bad = {n: r for n, r in rels.items() if not r <= PARITY_TOL}
            note = f"PARITY FAILED {bad}" if bad else ""
            meta[f"{impl} parity (bf16, T = 4096, rel. diff to olsm-triton)"] = ", ".join(
                f"{n} {r:.1e}" for n, r in rels.items())
        except Exception as e:  # a broken check is reported, never silently passed
            note = f"parity check failed to run: {type(e).__name__}: {str(e)[:200]}"
        print(f"{impl} parity: {meta.get(f'{impl} parity (bf16, T = 4096, rel. diff to olsm-triton)', '')} {note}",
              flush=True)
        for d, B, T in tqdm(cases, desc=impl):
            E = 2 * d
            q, k, v, coefs, D = make_inputs(name, B, T, E)
            floor = io_bytes_fwd(name, B, T, E) / (bw * 1e12) * 1e3
            fwd, fb, _ = runner(ext, q, k, v, coefs, D)
            measure(dict(recurrence=name, d_model=d, E=E, B=B, T=T, io_floor_fwd_ms=floor, impl=impl, note=note),
                    fwd, fb)
            del q, k, v, coefs, D
    write_reports(rows, meta, Path(args.out), args.stem)
    summary = versus_peers(rows)
    if summary:
        with open(Path(args.out, f"{args.stem}.md"), "a") as f:
            f.write("\n" + summary)
    print(Path(args.out, f"{args.stem}.md").read_text())


def versus_peers(rows) -> str:
    """Markdown: each olsm-triton variant's forward+backward time and peak memory over the CUDA
    peer's (mamba-ssm for mamba1, longhorn-cuda for longhorn_diag) at the same shape."""
    peer_of = {"mamba1": "mamba-ssm", "longhorn_diag": "longhorn-cuda"}
    lines = ["## olsm-triton variants / CUDA peer (fwd+bwd time, peak memory)", "",
             "| recurrence | d_model | B | T | impl | fwd+bwd × peer | peak × peer |", "|---|---|---|---|---|---|---|"]
    n = 0
    for r in rows:
        if not r["impl"].startswith("olsm-triton"):
            continue
        p = [x for x in rows if x["impl"] == peer_of.get(r["recurrence"]) and
             (x["recurrence"], x["d_model"], x["B"], x["T"]) == (r["recurrence"], r["d_model"], r["B"], r["T"])]
        if not p or not isinstance(p[0].get("fwdbwd_ms"), float) or not isinstance(r.get("fwdbwd_ms"), float):
            continue
        n += 1
        lines.append(f"| {r['recurrence']} | {r['d_model']} | {r['B']} | {r['T']} | {r['impl']} | "
                     f"{r['fwdbwd_ms'] / p[0]['fwdbwd_ms']:.3f} | {r['peak_mb'] / p[0]['peak_mb']:.3f} |")
    return "\n".join(lines) + "\n" if n else ""


if __name__ == "__main__":
    main()
