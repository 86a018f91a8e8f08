"""Benchmark the generated elementwise-gate Triton scan (Longhorn diagonal, Mamba-1) on a GPU.

Shapes are the Longhorn/Mamba block's scan: one head, value dimension E = 2·d_model (each
channel is a value column), key dimension N = 16 (the state per channel), for d_model 768 and
1024, at T = 2048 (B = 8) and T = 8192 (B = 2), bfloat16 inputs.

Compared, in one process:

* ``olsm-triton``: :func:`olsm.kernels.elementwise.elementwise_scan` (kernels printed from
  ``olsm.derive(longhorn_diag)`` / ``olsm.derive(mamba1)``);
* ``olsm-torch``: the chunked torch backend (``rec(..., backend="torch")``), which
  materialises G ``[B, T, H, K, V]``;
* ``longhorn-cuda``: the Longhorn paper's own CUDA scan (``online_selective_scan_cuda``),
  built at start-up from sources carried in ``--longhorn-src`` (never committed; see
  DESIGN §7). Its layout is channels-first ``[B, E, T]`` and it applies
  ``β = sigmoid(dt + t_bias)`` itself: the same recurrence, each in its natural layout.

Reported per case: median forward and forward+backward milliseconds, the peak extra memory
of forward+backward, and the forward I/O floor (bytes of q, k, v, coefficients and o over
the measured device-to-device copy bandwidth).

Usage::

    python -u benchmarks/bench_elementwise.py --out benchmarks/results \
        [--longhorn-src .carry/longhorn_ss] [--quick]
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

import torch

N_STATE = 16
CASES = [  # (d_model, B, T)
    (768, 8, 2048),
    (1024, 8, 2048),
    (768, 2, 8192),
    (1024, 2, 8192),
]
# (block_v, num_warps): the two best of the first H100 sweep (results/elementwise_h100_sweep.md;
# BV 32/64 with 2-4 warps were 10-30 % slower)
SWEEP = [(16, 1), (32, 1)]
PREFETCH = [(1, 1), (2, 2), (4, 2), (8, 4)]  # tokens loaded ahead (forward, backward)


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
def make_inputs(name: str, B: int, T: int, E: int, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    q = rn(B, T, 1, N_STATE).to(dtype)
    k = (rn(B, T, 1, N_STATE) / N_STATE**0.5).to(dtype)
    v = rn(B, T, 1, E).to(dtype)
    if name == "longhorn_diag":
        coefs = {"beta": torch.sigmoid(rn(B, T, 1, E)).to(dtype)}
    else:
        dt = torch.nn.functional.softplus(rn(B, T, 1, E) - 4.0).to(dtype)
        A = -torch.arange(1, N_STATE + 1, device="cuda", dtype=torch.float32).repeat(1, E, 1)
        coefs = {"dt": dt, "A": A}
    D = torch.ones(1, E, device="cuda")
    return q, k, v, coefs, D


def io_bytes_fwd(name: str, B: int, T: int, E: int, elem: int = 2) -> int:
    """Bytes the forward must move at least: read q, k, v, the coefficient; write o."""
    return B * T * (2 * N_STATE + 3 * E) * elem


# ------------------------------------------------------------------------------ runners
def olsm_triton(rec, q, k, v, coefs, D, block_v=None, num_warps=None, prefetch=None):
    from olsm.kernels.elementwise import elementwise_scan

    leaves = [q, k, v, D, *coefs.values()]

    def fwd():
        with torch.no_grad():
            return elementwise_scan(rec, q, k, v, coefs, scale=1.0, D=D, block_v=block_v,
                                    num_warps=num_warps, prefetch=prefetch)

    def fwdbwd():
        xs = [x.detach().requires_grad_(True) for x in leaves]
        c = dict(zip(coefs, xs[4:]))
        o, _ = elementwise_scan(rec, xs[0], xs[1], xs[2], c, scale=1.0, D=xs[3], block_v=block_v,
                                num_warps=num_warps, prefetch=prefetch)
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


def build_longhorn(src: Path, build_dir: Path):
    """Compile the Longhorn paper's online selective scan (3 sources) for sm_90."""
    from torch.utils.cpp_extension import load

    build_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", "16")
    return load(
        name="online_selective_scan_cuda",
        sources=[str(src / f) for f in (
            "online_selective_scan.cpp", "selective_scan_online_fwd.cu", "selective_scan_online_bwd.cu")],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=[
            "-O3", "-std=c++17", "-gencode", "arch=compute_90,code=sm_90", "--use_fast_math",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
            "--expt-relaxed-constexpr", "--expt-extended-lambda", "-lineinfo",
        ],
        build_directory=str(build_dir),
        verbose=False,
    )


def longhorn_cuda(ext, q, k, v, coefs, D):
    """The paper's kernel in its own layout: u, dt [B, E, T]; Q, K [B, 1, N, T]."""
    B, T, _, E = v.shape
    u = v[:, :, 0].transpose(1, 2).contiguous()
    Q = q[:, :, 0].permute(0, 2, 1).unsqueeze(1).contiguous()
    Kt = k[:, :, 0].permute(0, 2, 1).unsqueeze(1).contiguous()
    beta = coefs["beta"][:, :, 0].float().clamp(1e-4, 1 - 1e-4)
    dt = torch.logit(beta).to(v.dtype).transpose(1, 2).contiguous()  # sigmoid(dt) = β
    Dv = D[0].float().contiguous()
    t_bias = torch.zeros(E, device=v.device, dtype=torch.float32)

    def fwd():
        return ext.online_fwd(u, Q, Kt, dt, Dv, t_bias, None)

    def fwdbwd():
        out, x, *_ = ext.online_fwd(u, Q, Kt, dt, Dv, t_bias, None)
        ext.online_bwd(u, Q, Kt, dt, Dv, t_bias, None, out, x, out, None)

    return fwd, fwdbwd, (u, Q, Kt, dt, Dv, t_bias)


def check_longhorn_parity(ext, rec) -> float:
    """Relative difference of our scan and the paper's kernel on the same small problem."""
    from olsm.kernels.elementwise import elementwise_scan

    q, k, v, coefs, D = make_inputs("longhorn_diag", 1, 256, 64, dtype=torch.float32, seed=3)
    D = torch.randn_like(D)
    ours, _ = elementwise_scan(rec, q, k, v, coefs, scale=1.0, D=D)
    fwd, _, _ = longhorn_cuda(ext, q, k, v, coefs, D)
    theirs = fwd()[0].transpose(1, 2)[:, :, None]  # [B, E, T] -> [B, T, 1, E]
    # their β comes back through logit/sigmoid: compare with a tolerance, not bitwise
    return ((ours - theirs).norm() / theirs.norm()).item()


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
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--stem", default="elementwise_h100")
    ap.add_argument("--longhorn-src", default=".carry/longhorn_ss")
    ap.add_argument("--longhorn-build", default="/tmp/longhorn_build")
    ap.add_argument("--build-only", action="store_true", help="only compile the Longhorn extension")
    ap.add_argument("--longhorn-wait", type=float, default=0.0,
                    help="seconds to wait for a --build-only process (run in the background) to "
                         "finish before timing Longhorn; 0 builds in this process")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--quick", action="store_true", help="first case only")
    args = ap.parse_args()

    src = Path(args.longhorn_src)
    if args.build_only:
        t0 = time.time()
        build_longhorn(src, Path(args.longhorn_build))
        # the marker, not torch's lock file, tells the benchmark process the build is done:
        # calling load() while another process builds blocks on that lock
        Path(args.longhorn_build, "BUILD_OK").write_text(f"{time.time() - t0:.0f}s\n")
        print(f"longhorn build ok in {time.time() - t0:.0f}s")
        return

    from tqdm import tqdm

    import olsm
    import triton
    from olsm.objectives import longhorn_diag, mamba1

    assert torch.cuda.is_available(), "this benchmark needs a GPU"
    torch.backends.cuda.matmul.allow_tf32 = True
    recs = {"longhorn_diag": olsm.derive(longhorn_diag), "mamba1": olsm.derive(mamba1)}
    bw = copy_bandwidth_tbs()
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy bandwidth (TB/s, read+write)": f"{bw:.2f}",
        "dtype": "bfloat16 inputs, float32 state/accumulation",
        "timing": "median ms (triton.testing.do_bench; 3 CUDA-event runs when > 30 ms)",
    }
    print(meta, flush=True)

    # -- 1. tile sweep on the first shape --------------------------------------------------
    best = (None, None, None)
    if not args.no_sweep:
        d, B, T = CASES[0]
        q, k, v, coefs, D = make_inputs("longhorn_diag", B, T, 2 * d)
        res = []
        for bv, nw in tqdm(SWEEP, desc="tile sweep"):
            fwd, fb = olsm_triton(recs["longhorn_diag"], q, k, v, coefs, D, bv, nw)
            res.append((bench_ms(fb), bench_ms(fwd), bv, nw))
            print(f"  BV={bv:3d} warps={nw}: fwd {res[-1][1]:.3f} ms, fwd+bwd {res[-1][0]:.3f} ms", flush=True)
        res.sort()
        best = (res[0][2], res[0][3])
        meta["tile sweep (longhorn_diag, D=768, B=8, T=2048)"] = "; ".join(
            f"BV={bv},warps={nw}: {f:.3f}/{fb:.3f} ms" for fb, f, bv, nw in sorted(res, key=lambda r: (r[2], r[3])))
        meta["tile used"] = f"BV={best[0]}, num_warps={best[1]}"
        # prefetch depth: a sequential scan waits on each token's loads; loading further
        # ahead hides that latency at the cost of registers
        pres = []
        for pf in tqdm(PREFETCH, desc="prefetch sweep"):
            fwd, fb = olsm_triton(recs["longhorn_diag"], q, k, v, coefs, D, *best, prefetch=pf)
            f_ms, fb_ms = bench_ms(fwd), bench_ms(fb)
            pres.append((f_ms, fb_ms, pf))
            print(f"  prefetch {pf}: fwd {f_ms:.3f} ms, fwd+bwd {fb_ms:.3f} ms", flush=True)
        pf_fwd = min(pres, key=lambda r: r[0])[2][0]
        pf_bwd = min(pres, key=lambda r: r[1] - r[0])[2][1]  # backward time = fwd+bwd - fwd
        meta["prefetch sweep (fwd, bwd depth: fwd/fwd+bwd ms)"] = "; ".join(
            f"{pf}: {f:.3f}/{fb:.3f}" for f, fb, pf in pres)
        meta["prefetch used"] = str((pf_fwd, pf_bwd))
        best = best + ((pf_fwd, pf_bwd),)
        del q, k, v, coefs, D

    # -- 2. the cases ------------------------------------------------------------------------
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
              f"peak {row.get('peak_mb', float('nan')):.0f} MiB, floor {row['io_floor_fwd_ms']:.3f} ms", flush=True)
        write_reports(rows, meta, Path(args.out), args.stem)  # partial results survive a timeout

    cases = CASES[:1] if args.quick else CASES
    jobs = [(name, d, B, T) for name in recs for (d, B, T) in cases]
    for name, d, B, T in tqdm(jobs, desc="cases"):
        E = 2 * d
        q, k, v, coefs, D = make_inputs(name, B, T, E)
        floor = io_bytes_fwd(name, B, T, E) / (bw * 1e12) * 1e3
        base = dict(recurrence=name, d_model=d, E=E, B=B, T=T, io_floor_fwd_ms=floor)
        measure(dict(base, impl="olsm-triton"), *olsm_triton(recs[name], q, k, v, coefs, D, *best))
        if best[0] is not None:  # the tile choose_config picks for this shape (more programs when B is small)
            measure(dict(base, impl="olsm-triton-auto"), *olsm_triton(recs[name], q, k, v, coefs, D))
        if not args.no_torch:
            measure(dict(base, impl="olsm-torch"), *olsm_torch(recs[name], q, k, v, coefs, D))
        del q, k, v, coefs, D
        torch.cuda.empty_cache()

    # -- 3. the Longhorn paper's CUDA scan, last: its build may still be running ------------
    ext, why = None, ""
    marker = Path(args.longhorn_build, "BUILD_OK")
    if not src.exists():
        why = f"longhorn-cuda sources not found at {src}"
    elif args.longhorn_wait > 0:
        deadline = time.time() + args.longhorn_wait
        while not marker.exists() and time.time() < deadline:
            time.sleep(2)
        if not marker.exists():
            why = f"longhorn-cuda not built within the {args.longhorn_wait:.0f} s wait (build still running)"
    if src.exists() and not why:
        try:
            t0 = time.time()
            ext = build_longhorn(src, Path(args.longhorn_build))
            meta["longhorn-cuda"] = f"loaded in {time.time() - t0:.0f}s (build: {marker.read_text().strip() if marker.exists() else 'this process'})"
            meta["longhorn-cuda parity (fwd, fp32, rel. diff vs olsm)"] = f"{check_longhorn_parity(ext, recs['longhorn_diag']):.2e}"
        except Exception as e:
            why = f"longhorn-cuda unavailable: {type(e).__name__}: {str(e)[-300:]}"
    if why:
        meta["longhorn-cuda"] = why
        print(why, flush=True)
    meta["mamba_ssm selective_scan_fn"] = "not built (9-file build exceeds the device-time budget, DESIGN §7)"
    if ext is not None:
        for d, B, T in tqdm(cases, desc="longhorn-cuda"):
            E = 2 * d
            q, k, v, coefs, D = make_inputs("longhorn_diag", B, T, E)
            floor = io_bytes_fwd("longhorn_diag", B, T, E) / (bw * 1e12) * 1e3
            fwd, fb, _ = longhorn_cuda(ext, q, k, v, coefs, D)
            measure(dict(recurrence="longhorn_diag", d_model=d, E=E, B=B, T=T, io_floor_fwd_ms=floor,
                         impl="longhorn-cuda"), fwd, fb)
            del q, k, v, coefs, D
    write_reports(rows, meta, Path(args.out), args.stem)
    print(Path(args.out, f"{args.stem}.md").read_text())


if __name__ == "__main__":
    main()
