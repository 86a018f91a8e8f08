"""Where the elementwise backward spends its time: time variants with one stage removed.

No counters are available on the GPU machine (gVisor), so the backward's stages are placed
by difference: each ablation edits the *generated* backward source (a string replacement,
never the generator), imports it as its own module and times forward+backward against the
unchanged kernel. The ablated kernels compute wrong gradients: this is a measuring tool only.

Usage (GPU)::

    for i in 0 1 2 3 4 5 6 7; do python benchmarks/ablate_elementwise.py --warm $i/8 & done; wait
    python -u benchmarks/ablate_elementwise.py --out $OUT

(the ``--warm`` shards compile the variants into Triton's disk cache in parallel).

Writes ``elementwise_ablation.md``: per recurrence and ablation, forward+backward ms and the
difference to the baseline.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_elementwise import bench_ms, make_inputs, olsm_triton  # noqa: E402

#: name -> (what it removes, [(old, new), ...]); every `old` must occur in the source
ABLATIONS = {
    "baseline": ("nothing", []),
    "no-atomics": ("dq/dk plain stores instead of float32 atomics over value slices",
                   [("SPLIT_V)", "False)")]),
    "no-dq": ("the dq reduction and its atomics",
              [("_accumulate(dq +", "if False:\n                _accumulate(dq +")]),
    "no-slab-load": ("the block-entering state read from the scratch slab (uses the chunk's)",
                     [("S0 = tl.load(scr + i_blk * BK * BV + o_slab)", "S0 = S")]),
    "no-replay": ("the forward replay of each chunk",
                  [("for i_blk in range(0, nb - 1):", "for i_blk in range(0, 0):")]),
    "fwd-scan-2": ("the exclusive pair of the forward scan (S_{t-1} := S_t)",
                   [("_, S3, _, Sx3 = tl.associative_scan((G, b, one3, nz3), 0, _affine_excl)",
                     "_, S3 = tl.associative_scan((G, b), 0, _affine)\n            Sx3 = S3")]),
    "rev-scan-2": ("the exclusive pair of the reverse scan (P_t := Pi_t)",
                   [("_, Pi3, _, Px3 = tl.associative_scan((G, G * XP, one3, nz3), 0, _affine_excl, reverse=True)",
                     "_, Pi3 = tl.associative_scan((G, G * XP), 0, _affine, reverse=True)\n            Px3 = Pi3")]),
    "no-coef-grads": ("the per-value coefficient gradient (dβ or dΔ) and its store",
                      [("tl.store(g_", "if False:\n                tl.store(g_")]),
}


def ablated_module(src: str, name: str, edits):
    """Import ``src`` with ``edits`` applied as its own module (file under /tmp)."""
    for old, new in edits:
        if old not in src:
            raise RuntimeError(f"ablation {name!r}: {old!r} not in the generated source")
        src = src.replace(old, new)
    path = Path("/tmp/olsm_ablate") / f"ew_{name}_{hashlib.sha1(src.encode()).hexdigest()[:10]}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--stem", default="elementwise_ablation")
    ap.add_argument("--warm", default=None, help="I/N: only compile shard I of N (no timing)")
    args = ap.parse_args()

    import olsm
    import olsm.kernels.elementwise.scan as scan_mod
    from olsm.kernels.elementwise import generate_source
    from olsm.objectives import longhorn_diag, mamba1

    real = scan_mod.compile_recurrence
    lines = [f"# Elementwise backward ablations ({torch.cuda.get_device_name()})", "",
             "B = 8, T = 2048, E = 1536, N = 16, bf16, default tiles. Each row removes one stage of the "
             "generated backward (wrong gradients); fwd+bwd ms, and the baseline minus it.", "",
             "| recurrence | ablation | removes | fwd+bwd ms | saved ms |", "|---|---|---|---|---|"]
    jobs = [(r, a) for r in ("mamba1", "longhorn_diag") for a in ABLATIONS]
    if args.warm:
        i, n = (int(x) for x in args.warm.split("/"))
        jobs = jobs[i::n]
    for rname, obj in (("mamba1", mamba1), ("longhorn_diag", longhorn_diag)):
        rec = olsm.derive(obj)
        plan, base_mod = real(rec)
        src = generate_source(plan)
        T = 64 if args.warm else 2048  # compiling needs no long sequence
        q, k, v, coefs, D = make_inputs(rname, 8, T, 1536)
        base = None
        for name, (what, edits) in ABLATIONS.items():
            if (rname, name) not in jobs:
                continue
            try:
                mod = base_mod if not edits else ablated_module(src, f"{rname}_{name}", edits)
                scan_mod.compile_recurrence = lambda r, prefetch=None, _m=mod: (plan, _m)
                fb = olsm_triton(rec, q, k, v, coefs, D)[1]
                if args.warm:
                    fb()
                    continue
                ms = bench_ms(fb)
            except Exception as e:
                ms, what = float("nan"), f"{what} ({type(e).__name__}: {str(e)[:120]})"
            finally:
                scan_mod.compile_recurrence = real
            base = ms if name == "baseline" else base
            lines.append(f"| {rname} | {name} | {what} | {ms:.3f} | {base - ms:+.3f} |")
            print(lines[-1], flush=True)
    if args.warm:
        sys.stdout.flush()
        os._exit(0)  # skip interpreter teardown (compile threads have aborted it)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
