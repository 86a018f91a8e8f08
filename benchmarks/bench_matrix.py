"""Time olsm's Triton matrix-class kernel against FLA 0.6.0 and SDPA on one GPU.

Recurrences (bf16, per head D = K = V):

| ours (``chunk_matrix`` / ``chunk_delta``)  | FLA 0.6.0                 |
|-------------------------------------------|---------------------------|
| linear attention (no decay)               | ``chunk_simple_gla`` g=None |
| Mamba2 (scalar decay [B,T,H])             | ``chunk_simple_gla``      |
| GLA (per-key decay [B,T,H,K])             | ``chunk_gla``             |
| DeltaNet (``chunk_delta`` c=β, u=βv)      | ``chunk_delta_rule``      |
| Gated DeltaNet (c=αβ, + scalar decay)     | ``chunk_gated_delta_rule``|
| DPLR (RWKV-7-like, per-key decay, a ≠ b)  | ``chunk_dplr_delta_rule`` |
| Longhorn (c=ε=β/(1+βkᵀk), u=εv)           | — (ours only)             |
| SDPA causal (flash attention)             | —                         |

Timing: ``triton.testing.do_bench`` (CUDA events, warm-up, median ms) of the forward and of
forward+backward. It also measures device-to-device copy bandwidth and prints the I/O floor
(read q, k, v and write o once: 4·B·T·H·D bf16 elements forward, 11 forward+backward).
FLA kernels that refuse (its gated backward on Hopper with Triton < 3.7.1) are recorded as
"refused". Results: ``benchmarks/results/matrix_bench.{md,csv,png}`` (or ``--out``).

Usage (on the GPU machine; FLA from a carried wheel)::

    python benchmarks/bench_matrix.py [--shapes 8,2048,16,128 ...] [--budget-s 300] [--out DIR]
        [--variants new legacy] [--no-fla] [--autotune-cache .carry/autotune.tar --autotune-save $OUT/autotune.tar]

``--autotune-cache`` seeds Triton's on-disk autotuning results from a tar of an earlier session
(``autotune_cache.py``) and ``--autotune-save`` writes them after every FLA row, so FLA's
minutes of autotuning are paid once, not every session (carry the tar in ``.carry/``).

``--variants`` times our kernel under several code paths in one process (A/B), each row named
``method@variant`` when more than one is asked for, several joined with ``+``: ``new`` (the
library's defaults: fused forward and Triton backward where they apply, storage-dtype dot
operands, the rows4 WY inverse, the delta form's X and ν kept for the backward, the rank-0
sequential passes split along the sequence when few programs walk them), ``run8`` (the defaults
up to run 8: fp32 dot operands, the levels2 inverse, X and ν re-derived, whole walks); one switch
back each: ``fp32dots``, ``levels2`` / ``inv3`` (levels3) / ``rows16`` (WY inverse),
``recompute`` (X and ν), ``walk`` / ``split`` (rank-0 sequential passes); ``autograd_bwd`` (the
same forward, the autograd backward), ``general`` (general path, Triton inverse), ``legacy``
(general path with ``torch.linalg.solve_triangular``: the code measured in runs 2 and 3),
``pair`` (the delta members through ``chunk_matrix`` with the general pair ``(−c k, k)``: the
fused rank-1 kernels measured up to run 6), ``stages2`` / ``stages3`` / ``stages4`` (the forward
walk's num_stages), ``chunk128`` (chunk length C = 128 instead of the library's 64), ``wyfp32``
(the WY kernel's X and Y dots on fp32 copies, the default up to run 16). The paths are
chosen through the ``OLSM_MATRIX_*`` switches of ``ENV_DEFAULTS``, read at every call, and C
through this script's ``OLSM_BENCH_CHUNK`` (``BENCH_DEFAULTS``).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPES = [(8, 2048, 16, 128), (2, 8192, 16, 128), (1, 32768, 16, 128)]
METHODS = ["linear_attention", "mamba2", "gla", "deltanet", "gated_deltanet", "dplr", "longhorn", "sdpa"]
# FLA's order in the second pass: most informative first (its autotuning costs minutes per op)
FLA_ORDER = ["deltanet", "linear_attention", "mamba2", "gated_deltanet", "gla", "dplr"]
FLA_NAME = {"linear_attention": "chunk_simple_gla", "mamba2": "chunk_simple_gla", "gla": "chunk_gla",
            "deltanet": "chunk_delta_rule", "gated_deltanet": "chunk_gated_delta_rule",
            "dplr": "chunk_dplr_delta_rule"}


def import_kernels():
    """``olsm.kernels.matrix`` (``chunk_matrix``, ``chunk_delta``)."""
    try:
        import olsm.kernels.matrix as km
    except ModuleNotFoundError:  # source checkout without `pip install -e .`
        sys.path.insert(0, str(ROOT / "tests"))
        from test_triton_matrix import _import_kernels

        km = _import_kernels()
    return km


def import_fla():
    try:
        import fla  # noqa: F401
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.generalized_delta_rule import chunk_dplr_delta_rule
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as err:  # noqa: BLE001 - report and carry on without FLA
        print(f"FLA unavailable: {err!r}")
        return None
    return dict(chunk_simple_gla=chunk_simple_gla, chunk_gla=chunk_gla, chunk_delta_rule=chunk_delta_rule,
                chunk_gated_delta_rule=chunk_gated_delta_rule, chunk_dplr_delta_rule=chunk_dplr_delta_rule)


def make_inputs(B, T, H, D, dtype=torch.bfloat16, seed=0, device="cuda"):
    """Random leaf tensors in the ranges models use: unit keys, β in (0, 1), log-sigmoid gates."""
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=device, dtype=torch.float32)  # noqa: E731
    x = dict(
        q=r(B, T, H, D), k=F.normalize(r(B, T, H, D), dim=-1), v=r(B, T, H, D),
        beta=torch.rand(B, T, H, generator=g, device=device),
        g=F.logsigmoid(r(B, T, H) + 4.0), gk=F.logsigmoid(r(B, T, H, D) + 3.0) / 4,
        b=F.normalize(r(B, T, H, D), dim=-1),
    )
    out = {}
    for name, t in x.items():
        t = t.to(torch.float32 if name in ("g", "gk") else dtype)
        out[name] = t.requires_grad_()
    return out


# variant -> (environment switches that differ from the defaults, delta members via chunk_delta)
ENV_DEFAULTS = {"OLSM_MATRIX_PATH": "auto", "OLSM_MATRIX_SOLVE": "triton", "OLSM_MATRIX_BWD": "auto",
                "OLSM_MATRIX_INVERSE": "rows4", "OLSM_MATRIX_DOTS": "storage", "OLSM_MATRIX_DELTA_SAVE": "keep",
                "OLSM_MATRIX_STATE": "auto", "OLSM_MATRIX_SPLIT_PER_SM": "4", "OLSM_MATRIX_STATE_STAGES": "auto",
                "OLSM_MATRIX_WY_DOTS": "storage", "OLSM_MATRIX_DQDW": "auto",
                "OLSM_MATRIX_BWD_DOTS": "storage", "OLSM_MATRIX_WALK_DECAY": "auto"}
# this script's own switches (not the library's), reset with ENV_DEFAULTS by every variant
BENCH_DEFAULTS = {"OLSM_BENCH_CHUNK": "64"}
VARIANTS = {
    "new": ({}, True),
    "run8": ({"OLSM_MATRIX_INVERSE": "levels2", "OLSM_MATRIX_DOTS": "fp32", "OLSM_MATRIX_DELTA_SAVE": "recompute",
              "OLSM_MATRIX_STATE": "walk"}, True),
    "fp32dots": ({"OLSM_MATRIX_DOTS": "fp32"}, True),
    "levels2": ({"OLSM_MATRIX_INVERSE": "levels2"}, True),
    "inv3": ({"OLSM_MATRIX_INVERSE": "levels3"}, True),
    "rows16": ({"OLSM_MATRIX_INVERSE": "rows16"}, True),
    "recompute": ({"OLSM_MATRIX_DELTA_SAVE": "recompute"}, True),
    "walk": ({"OLSM_MATRIX_STATE": "walk"}, True),
    "split": ({"OLSM_MATRIX_STATE": "split"}, True),
    "stages2": ({"OLSM_MATRIX_STATE_STAGES": "2"}, True),
    "stages3": ({"OLSM_MATRIX_STATE_STAGES": "3"}, True),
    "stages4": ({"OLSM_MATRIX_STATE_STAGES": "4"}, True),
    "wyfp32": ({"OLSM_MATRIX_WY_DOTS": "fp32"}, True),       # the WY kernel's X, Y dots on fp32 copies (run 16's default)
    "dwt": ({"OLSM_MATRIX_DQDW": "transposed"}, True),      # dw transposed from dA alone, the delta form too
    "bwdfp32": ({"OLSM_MATRIX_BWD_DOTS": "fp32"}, True),  # the rank-0 dq/dw and du kernels on fp32 copies (run 20's)
    "walkcumsum": ({"OLSM_MATRIX_WALK_DECAY": "cumsum"}, True),  # scalar-decay walks read G made once (run 22)
    "walkinline": ({"OLSM_MATRIX_WALK_DECAY": "inline"}, True),  # every walk sums its decay inline (run 22's)
    "walkcumsumall": ({"OLSM_MATRIX_WALK_DECAY": "cumsum_all"}, True),  # the walks with a pair read G too
    "dwboth": ({"OLSM_MATRIX_DQDW": "both"}, True),         # dA and dAᵀ by two products everywhere (run 17's)
    "chunk128": ({"OLSM_BENCH_CHUNK": "128"}, True),     # C = 128: half the chunk states (this script's switch)
    "pair": ({}, False),
    "autograd_bwd": ({"OLSM_MATRIX_BWD": "autograd"}, False),
    "general": ({"OLSM_MATRIX_PATH": "general", "OLSM_MATRIX_BWD": "autograd"}, False),
    "legacy": ({"OLSM_MATRIX_PATH": "general", "OLSM_MATRIX_SOLVE": "torch", "OLSM_MATRIX_BWD": "autograd"}, False),
}


def set_variant(variant):
    """Select our kernel's code path for the calls that follow (see the module docstring); returns
    whether the delta members go through ``chunk_delta``. ``a+b`` combines variants' switches."""
    env, delta = dict(ENV_DEFAULTS, **BENCH_DEFAULTS), True
    for part in variant.split("+"):
        more, d = VARIANTS[part]
        env.update(more)
        delta = delta and d
    os.environ.update(env)
    return delta


def variant_name(text):
    """argparse type: a variant of VARIANTS, or several joined with ``+``."""
    if not all(part in VARIANTS for part in text.split("+")):
        raise argparse.ArgumentTypeError(f"{text!r}: variants are {', '.join(sorted(VARIANTS))}, joined with +")
    return text


def ours(method, x, km, delta=True):
    """The recurrence as a user of olsm writes it (coefficient algebra included in the time).
    ``delta``: the delta members (c, u) through ``chunk_delta``, else ``chunk_matrix`` with the
    pair ``(−c k, k)``."""
    q, k, v, beta, g, gk, b = (x[n] for n in ("q", "k", "v", "beta", "g", "gk", "b"))
    # the chunk length C (variant chunk128; the library's default is 64)
    kw = dict(scale=q.shape[-1] ** -0.5, chunk_size=int(os.environ.get("OLSM_BENCH_CHUNK", "64")))
    bt = beta[..., None]
    if method == "linear_attention":
        return km.chunk_matrix(q, k, v, **kw)[0]
    if method == "mamba2":
        return km.chunk_matrix(q, k, v, g, **kw)[0]
    if method == "gla":
        return km.chunk_matrix(q, k, v, gk, **kw)[0]
    if method == "dplr":
        return km.chunk_matrix(q, k, v, gk, [(-bt * k, b)], **kw)[0]
    # the written value is s v (s = β, or ε for Longhorn): chunk_delta forms it in-kernel, and
    # Longhorn's ε = β / (1 + β kᵀk) from kk_coef = β, as Recurrence calls it; the pair path gets
    # ε and s v as tensors
    kk_coef = None
    if method == "deltanet":
        c, s, ld = beta, beta, None
    elif method == "gated_deltanet":
        c, s, ld = g.exp() * beta, beta, g
    elif method == "longhorn":
        c = s = kk_coef = beta
        ld = None
    else:
        raise ValueError(method)
    if delta:
        return km.chunk_delta(q, k, v, c, ld, u_scale=s, kk_coef=kk_coef, **kw)[0]
    if kk_coef is not None:
        c = s = beta / (1 + beta * k.float().pow(2).sum(-1))     # kᵀk in fp32, as the kernels take it
    return km.chunk_matrix(q, k, s[..., None] * v, ld, [(-c[..., None].to(k.dtype) * k, k)], **kw)[0]


def theirs(method, x, fla):
    q, k, v, beta, g, gk, b = (x[n] for n in ("q", "k", "v", "beta", "g", "gk", "b"))
    scale = q.shape[-1] ** -0.5
    if method == "sdpa":
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True).transpose(1, 2)
    fn = fla[FLA_NAME[method]]
    if method == "linear_attention":
        return fn(q, k, v, scale=scale)[0]
    if method == "mamba2":
        return fn(q, k, v, g=g, scale=scale)[0]
    if method == "gla":
        return fn(q, k, v, gk, scale=scale)[0]
    if method == "deltanet":
        return fn(q, k, v, beta, scale=scale)[0]
    if method == "gated_deltanet":
        return fn(q, k, v, g, beta, scale=scale)[0]
    if method == "dplr":
        return fn(q, k, v, -beta[..., None] * k, b, gk, scale=scale)[0]
    raise ValueError(method)


def bench(fn, x, backward):
    """Median ms of ``fn(x)`` (and its backward), or the error text if it refuses."""
    import triton

    leaves = list(x.values())
    try:
        if backward:
            o = fn(x)
            d_o = torch.randn_like(o)

            def step():
                fn(x).backward(d_o)
        else:
            def step():
                with torch.no_grad():
                    fn(x)
        t0 = time.time()
        step()
        torch.cuda.synchronize()
        t1 = time.time()
        ms = triton.testing.do_bench(step, warmup=25, rep=100, grad_to_none=leaves, return_mode="median")
        print(f"    first call (compile/autotune) {t1 - t0:.1f} s, timing {time.time() - t1:.1f} s")
        return ms
    except Exception as err:  # noqa: BLE001 - FLA refusals and OOMs become table entries
        msg = f"{type(err).__name__}: {err}".splitlines()[0][:160]
        print(f"    refused/failed: {msg}")
        return "refused" if ("Triton" in msg or "Hopper" in msg or "NotImplemented" in msg) else "failed"


def peak_mib(fn, x):
    """Peak memory of one forward+backward above what the inputs hold (MiB; gradients, saved
    tensors and workspaces included), or "-" if it fails."""
    leaves = list(x.values())
    try:
        for t in leaves:
            t.grad = None
        o = fn(x)
        d_o = torch.randn_like(o)
        del o
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(x).backward(d_o)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        for t in leaves:
            t.grad = None
        return round(peak / 2 ** 20, 1)
    except Exception:  # noqa: BLE001 - a refusal is already in the time columns
        return "-"


def copy_bandwidth():
    import triton

    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=100, return_mode="median")
    return 2 * x.numel() / (ms * 1e-3) / 1e12  # TB/s, bytes read + written


def fmt(t):
    return f"{t:.2f}" if isinstance(t, float) else str(t)


def main():
    from tqdm import tqdm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=[",".join(map(str, s)) for s in SHAPES])
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new rows after this")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--variants", nargs="*", default=["new"], type=variant_name,
                    help="code paths of ours to time (A/B); rows become method@variant if several")
    ap.add_argument("--no-fla", action="store_true", help="skip FLA (its autotuning costs minutes)")
    ap.add_argument("--autotune-cache", help="tar of Triton autotuning results to start from (autotune_cache.py)")
    ap.add_argument("--autotune-save", help="write the autotuning results to this tar after every FLA row")
    args = ap.parse_args()
    if args.autotune_cache or args.autotune_save:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import autotune_cache

        autotune_cache.enable(args.autotune_cache)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    import triton

    km = import_kernels()
    fla = None if args.no_fla else import_fla()
    fla_version = getattr(sys.modules.get("fla"), "__version__", "n/a")
    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    head = (f"device {dev}, torch {torch.__version__}, triton {triton.__version__}, fla {fla_version}; "
            f"copy bandwidth {bw:.2f} TB/s (read + write)")
    print(head)

    shapes = [tuple(int(p) for p in s.split(",")) for s in args.shapes]
    rows = {}  # (shape, label) -> row; label = method, or method@variant when A/B-ing
    tag = (lambda m, v: m) if len(args.variants) == 1 else (lambda m, v: f"{m}@{v}")  # noqa: E731
    labels = [(m, v) for m in args.methods for v in (args.variants if m != "sdpa" else [None])]
    for shape in shapes:
        for method, variant in labels:
            B, T, H, D = shape
            elems = B * T * H * D
            rows[shape, method if variant is None else tag(method, variant)] = dict(
                B=B, T=T, H=H, D=D, method=method if variant is None else tag(method, variant),
                ours_fwd="-", ours_fwdbwd="-",
                ref="sdpa causal" if method == "sdpa" else ("fla." + FLA_NAME[method] if method in FLA_NAME else "-"),
                ref_fwd="-", ref_fwdbwd="-",
                floor_fwd=round(4 * elems * 2 / (bw * 1e12) * 1e3, 4),
                floor_fwdbwd=round(11 * elems * 2 / (bw * 1e12) * 1e3, 4))
    # Two passes, method-major (each kernel compiles, and FLA autotunes, once, then runs every
    # shape): ours and SDPA first, then FLA, whose first call autotunes for minutes.
    jobs = [("ours", m, v, s) for m in args.methods if m != "sdpa" for v in args.variants for s in shapes]
    jobs += [("ref", "sdpa", None, s) for s in shapes if "sdpa" in args.methods]
    if fla is not None:
        jobs += [("ref", m, None, s) for m in FLA_ORDER if m in args.methods for s in shapes]
    for who, method, variant, shape in tqdm(jobs, desc="bench", file=sys.stdout, mininterval=5):
        if time.time() - t_start > args.budget_s:
            print(f"  budget reached: skipping {who} {method} {variant or ''} at {shape}")
            continue
        x = make_inputs(*shape)
        if who == "ours":
            delta = set_variant(variant)
            fn = lambda z: ours(method, z, km, delta)  # noqa: E731
        else:
            fn = lambda z: theirs(method, z, fla)  # noqa: E731
        targets = ([rows[shape, tag(method, v)] for v in args.variants] if who == "ref" and method != "sdpa"
                   else [rows[shape, method if variant is None else tag(method, variant)]])
        row = targets[0]
        for mode, backward in (("fwd", False), ("fwdbwd", True)):
            t = bench(fn, x, backward)
            for r in targets:  # FLA is timed once and shown on every variant's row
                r[f"{who}_{mode}"] = round(t, 4) if isinstance(t, float) else t
        mib = peak_mib(fn, x) if isinstance(row[f"{who}_fwdbwd"], float) else "-"
        for r in targets:
            r[f"{who}_mib"] = mib
        for r in targets:
            for mode in ("fwd", "fwdbwd"):
                a, b = r[f"ours_{mode}"], r[f"ref_{mode}"]
                r[f"ratio_{mode}"] = round(a / b, 2) if isinstance(a, float) and isinstance(b, float) else "-"
        print(f"  {row['method']:17s} {shape} ours {fmt(row['ours_fwd'])} / {fmt(row['ours_fwdbwd'])} ms"
              f" | {row['ref']} {fmt(row['ref_fwd'])} / {fmt(row['ref_fwdbwd'])} ms"
              f" | ratio {row['ratio_fwd']} / {row['ratio_fwdbwd']}")
        del x
        torch.cuda.empty_cache()
        save(list(rows.values()), out, head)
        if args.autotune_save and who == "ref":
            print(f"  autotuning results saved: {autotune_cache.save(args.autotune_save)}")
    rows = list(rows.values())
    save(rows, out, head)
    print("\n".join(write_markdown(rows, out, head)))


def save(rows, out, head):
    """CSV, markdown table and plot of what has been measured so far."""
    fields = ["B", "T", "H", "D", "method", "ours_fwd", "ours_fwdbwd", "ours_mib", "ref", "ref_fwd", "ref_fwdbwd",
              "ref_mib", "ratio_fwd", "ratio_fwdbwd", "floor_fwd", "floor_fwdbwd"]
    for r in rows:
        for f in ("ratio_fwd", "ratio_fwdbwd", "ours_mib", "ref_mib"):
            r.setdefault(f, "-")
    with open(out / "matrix_bench.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    write_markdown(rows, out, head)
    try:
        plot(rows, out / "matrix_bench.png", head)
    except Exception as err:  # noqa: BLE001 - a plot is not worth losing the numbers
        print(f"  plot failed: {err!r}")


def write_markdown(rows, out, head):
    md = [f"# Matrix-class kernel vs FLA (bf16, median ms)\n\n{head}\n",
          "ratio = ours / reference (lower is better for us). floor = I/O floor at the measured "
          "copy bandwidth.\n",
          "MiB = peak memory of one forward+backward above the inputs (saved tensors, gradients, workspaces).\n",
          "| B,T,H,D | method | ours fwd | ours fwd+bwd | ours MiB | reference | ref fwd | ref fwd+bwd | ref MiB | "
          "ratio fwd | ratio fwd+bwd | floor fwd | floor fwd+bwd |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['B']},{r['T']},{r['H']},{r['D']} | {r['method']} | {fmt(r['ours_fwd'])} | "
                  f"{fmt(r['ours_fwdbwd'])} | {r.get('ours_mib', '-')} | {r['ref']} | {fmt(r['ref_fwd'])} | "
                  f"{fmt(r['ref_fwdbwd'])} | {r.get('ref_mib', '-')} | {r['ratio_fwd']} | {r['ratio_fwdbwd']} | "
                  f"{r['floor_fwd']:.3f} | {r['floor_fwdbwd']:.3f} |")
    (out / "matrix_bench.md").write_text("\n".join(md) + "\n")
    return md


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["B"], r["T"], r["H"], r["D"]) for r in rows}, key=lambda s: s[1])
    if not shapes:
        return
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        sub = [r for r in rows if (r["B"], r["T"], r["H"], r["D"]) == shape]
        names = [r["method"] for r in sub]
        xs = range(len(sub))
        width = 0.2
        series = [("ours fwd", "ours_fwd"), ("ours fwd+bwd", "ours_fwdbwd"),
                  ("ref fwd", "ref_fwd"), ("ref fwd+bwd", "ref_fwdbwd")]
        for j, (label, key) in enumerate(series):
            vals = [r[key] if isinstance(r[key], float) else math.nan for r in sub]
            ax.bar([x + (j - 1.5) * width for x in xs], vals, width, label=label)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
        ax.set_title(f"B,T,H,D = {shape}")
        ax.set_ylabel("median ms (bf16)")
        if any(isinstance(r[k], float) for r in sub for _, k in series):
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    os.environ.setdefault("TRITON_PRINT_AUTOTUNING", "0")
    main()
