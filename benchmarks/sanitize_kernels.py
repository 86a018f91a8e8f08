"""Run the Triton kernels (the fused matrix ones and the generated elementwise scans, forward and
backward) under ``compute-sanitizer --tool memcheck``.

A Triton miscompile can read shared memory past a buffer without failing a numerical test: on an
H200 with Triton 3.6, value blocks of 16 / 32 next to 64-key rows did, and faulted only in some
processes (``fused.launch_shape``). Each case runs in its own process (a fault poisons the CUDA
context), small enough that the sanitizer's slowdown stays in seconds; compiles dominate.

    python -u benchmarks/sanitize_kernels.py [--only matrix|elementwise|defaults] [--paths rank0 ...]
        [--switch WALK_DECAY] [--jobs 6]
        [--out benchmarks/results/sanitizer.txt]

Cases: ``(path, K, V, dtype, decay, heads, switches)``; path ``delta`` is ``chunk_delta``
(with ``u_scale``), ``longhorn`` the same with ``kk_coef`` (ε formed in the kernels), ``pair``
is ``chunk_matrix`` with the pair ``(−c k, k)``, ``rank0`` has no low-rank part, ``dplr`` is
``chunk_matrix`` with a per-key decay and an unrelated pair (a, b) (the RWKV-7 form;
``dplr128``: chunks of 128, where the rank-1 kernels take 8 warps; ``dplr-strong[128]``: decays
strong enough for ``perkey_pair``'s 16-row sub-block kernels); switches are
``OLSM_MATRIX_*=value`` / ``OLSM_ELEMENTWISE_*=value`` settings away from the library's defaults,
comma-separated (the split cases, the slab-segment and gradient-slab ones and the one-head rank-0 ones use T = 1300:
the segments need long sequences and few programs; without a decay the default splits them). Four heads at B = 2 give few programs, so the
sequential passes take their narrowest blocks (``sequence_launch``); twenty keep the wide ones. Path ``elem:<objective>`` runs
the catalogue's elementwise member through ``Recurrence`` (backend triton) with K = d_state and
V = E channels (heads unused; ``OLSM_ELEMENTWISE_BWD_SPLIT=2`` splits the backward's two chunks).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed

import torch
from tqdm import tqdm

FP32 = "OLSM_MATRIX_DOTS=fp32"      # the default is storage-dtype dot operands (run 9)
SPLIT = "OLSM_MATRIX_STATE=split"
CASES = [
    ("delta", 64, 16, "bf16", 0, 4, FP32), ("delta", 64, 16, "bf16", 1, 4, ""), ("delta", 64, 32, "bf16", 1, 4, FP32),
    ("delta", 32, 16, "bf16", 1, 4, ""), ("delta", 128, 128, "bf16", 1, 4, ""),
    ("delta", 128, 128, "bf16", 1, 20, FP32), ("delta", 100, 72, "bf16", 1, 4, ""),
    ("delta", 64, 64, "fp16", 1, 4, ""), ("delta", 128, 128, "fp32", 1, 4, ""),
    ("rank0", 128, 128, "bf16", 1, 4, ""), ("rank0", 64, 16, "bf16", 1, 4, ""), ("pair", 64, 16, "bf16", 1, 4, ""),
    ("pair", 32, 32, "bf16", 1, 4, ""), ("pair", 128, 128, "bf16", 1, 20, ""),
    ("longhorn", 128, 128, "bf16", 1, 4, FP32), ("longhorn", 64, 16, "bf16", 0, 4, ""),
    ("longhorn", 64, 64, "bf16", 1, 20, ""), ("delta", 64, 32, "bf16", 1, 20, ""),
    ("delta", 128, 128, "bf16", 1, 4, "OLSM_MATRIX_INVERSE=rows16"),
    ("delta", 64, 64, "bf16", 1, 4, "OLSM_MATRIX_INVERSE=levels2"),
    ("delta", 128, 128, "bf16", 1, 4, "OLSM_MATRIX_DELTA_SAVE=recompute"),
    ("longhorn", 64, 64, "bf16", 1, 4, "OLSM_MATRIX_DELTA_SAVE=recompute"),
    ("rank0", 128, 128, "bf16", 1, 1, SPLIT + "," + FP32), ("rank0", 64, 16, "bf16", 0, 1, ""),
    ("rank0", 128, 128, "bf16", 0, 1, ""),
    ("dplr128", 128, 128, "bf16", 1, 4, ""), ("dplr", 128, 128, "bf16", 1, 4, ""), ("dplr", 128, 128, "fp32", 1, 4, ""),
    ("dplr", 64, 16, "bf16", 1, 4, ""), ("dplr", 100, 72, "bf16", 1, 20, ""),
    ("dplr-strong", 128, 128, "bf16", 1, 4, ""), ("dplr-strong128", 100, 72, "bf16", 1, 4, ""),
    ("elem:mamba1", 16, 384, "bf16", 0, 1, ""), ("elem:longhorn_diag", 16, 384, "bf16", 0, 1, ""),
    ("elem:mamba1", 16, 384, "fp32", 0, 1, ""), ("elem:longhorn_diag", 8, 100, "bf16", 0, 1, ""),
    ("elem:mamba1", 16, 384, "bf16", 0, 1, "OLSM_ELEMENTWISE_BWD_SPLIT=2"),
    ("elem:longhorn_diag", 8, 100, "bf16", 0, 1, "OLSM_ELEMENTWISE_BWD_SPLIT=2"),
    ("elem:mamba1", 16, 384, "bf16", 0, 1, "OLSM_ELEMENTWISE_SLAB_SEGMENTS=2,OLSM_ELEMENTWISE_BWD_SPLIT=2"),
    # the gradient-buffer slab (the default slab "auto" takes it for mamba1 on a GPU): named for
    # longhorn_diag (bf16: halves in dv and dβ) and mamba1 in fp32 (whole in dv), T = 1300
    ("elem:longhorn_diag", 16, 384, "bf16", 0, 1, "OLSM_ELEMENTWISE_SLAB=grads"),
    ("elem:mamba1", 16, 384, "fp32", 0, 1, "OLSM_ELEMENTWISE_SLAB=grads"),
    ("rank0", 128, 128, "bf16", 1, 1, SPLIT),
    ("rank0", 128, 128, "bf16", 1, 1, "OLSM_MATRIX_WALK_DECAY=cumsum"),
    ("rank0", 128, 128, "bf16", 1, 1, SPLIT + ",OLSM_MATRIX_WALK_DECAY=cumsum"),
    ("delta", 128, 128, "bf16", 1, 1, "OLSM_MATRIX_WALK_DECAY=cumsum_all"),
    ("delta", 128, 128, "bf16", 1, 1, SPLIT + ",OLSM_MATRIX_WALK_DECAY=cumsum_all"),
]
DTYPES = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)


def run_case(path: str, K: int, V: int, dtype: str, decay: int, H: int, device: str = "cuda", T: int = 130) -> None:
    """One forward and backward of ``path`` at B = 2, T tokens (130: three chunks, the last short)."""
    from olsm.kernels.matrix import chunk_delta, chunk_matrix

    dt, B = DTYPES[dtype], 2
    if path.startswith("elem:"):
        return run_elementwise(path[5:], K, V, dt, B, T, device)
    gen = torch.Generator(device=device).manual_seed(0)
    rand = lambda *s: torch.randn(*s, device=device, generator=gen)  # noqa: E731
    q, u = rand(B, T, H, K).to(dt).requires_grad_(), rand(B, T, H, V).to(dt).requires_grad_()
    k = torch.nn.functional.normalize(rand(B, T, H, K), dim=-1).to(dt).requires_grad_()
    c, s = (torch.rand(B, T, H, device=device, generator=gen).requires_grad_() for _ in range(2))
    ld = (-0.5 * torch.rand(B, T, H, device=device, generator=gen)).requires_grad_() if decay else None
    h0 = rand(B, H, K, V).requires_grad_()
    kw = dict(scale=K ** -0.5, initial_state=h0, output_final_state=True)
    if path in ("delta", "longhorn"):
        o, S = chunk_delta(q, k, u, c, ld, u_scale=s, kk_coef=c if path == "longhorn" else None, **kw)
    elif path.startswith("dplr"):
        # -strong: decays of -1 per step on average, most chunks on perkey_pair's sub-block kernels
        lo = -2.0 if "strong" in path else -0.5
        ld = (lo * torch.rand(B, T, H, K, device=device, generator=gen)).requires_grad_()
        a, b = ((0.3 * rand(B, T, H, K)).to(dt).requires_grad_() for _ in range(2))
        o, S = chunk_matrix(q, k, u, ld, [(a, b)], chunk_size=128 if path.endswith("128") else 64, **kw)
    else:
        pairs = [((-c[..., None] * k.float()).to(dt), k)] if path == "pair" else []
        o, S = chunk_matrix(q, k, u, ld, pairs, **kw)
    (o.float().sum() + S.sum()).backward()
    _sync(device)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_elementwise(name: str, K: int, V: int, dt, B: int, T: int, device: str = "cuda") -> None:
    """The catalogue's elementwise member ``name`` through ``Recurrence``, one head, with an
    initial state, forward and backward to every input."""
    import olsm
    import olsm.objectives as objectives

    rec = olsm.derive(getattr(objectives, name))
    gen = torch.Generator(device=device).manual_seed(0)
    rand = lambda *s: torch.randn(*s, device=device, generator=gen)  # noqa: E731
    q, k, v = (rand(B, T, 1, d).to(dt).requires_grad_() for d in (K, K, V))
    coefs = {}
    for spec in rec.inputs:     # shapes from the spec, values inside its constraint
        shape = [dict(B=B, T=T, H=1, K=K, V=V)[a] for a in spec.shape.strip("[]").split(", ")]
        x = torch.rand(*shape, device=device, generator=gen) * 0.5 + 0.05
        coefs[spec.name] = (-x if spec.constraint == "negative" else x).requires_grad_()
    h0 = rand(B, 1, K, V).requires_grad_()
    o, S = rec(q, k, v, backend="triton", initial_state=h0, output_final_state=True, **coefs)
    (o.float().sum() + S.sum()).backward()
    _sync(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "sanitizer.txt"))
    ap.add_argument("--only", choices=("matrix", "elementwise", "defaults"),
                    help="run one family's cases, or the matrix cases on the library's default path")
    ap.add_argument("--paths", nargs="*", help="only the cases whose path starts with one of these, e.g. dplr")
    ap.add_argument("--switch", help="only the cases whose switches contain this text, e.g. WALK_DECAY")
    ap.add_argument("--jobs", type=int, default=1, help="cases run at once (each its own process)")
    ap.add_argument("--case", nargs=7, help=argparse.SUPPRESS)      # the child process
    args = ap.parse_args()
    if args.case:
        path, K, V, dtype, decay, H, switches = args.case
        # the splits need long sequences (and slab segments long checkpoint intervals)
        long = any(w in switches for w in ("STATE=split", "SLAB_SEGMENTS", "SLAB=grads")) or (path == "rank0" and H == "1")
        run_case(path, int(K), int(V), dtype, int(decay), int(H), T=1300 if long else 130)
        return
    lines, bad = [f"# compute-sanitizer memcheck, {torch.cuda.get_device_name()}, torch {torch.__version__}"], 0
    family = {"matrix": lambda c: not c[0].startswith("elem:"), "elementwise": lambda c: c[0].startswith("elem:"),
              "defaults": lambda c: not c[0].startswith("elem:") and not c[-1], None: lambda c: True}[args.only]
    cases = [c for c in CASES if family(c) and (not args.paths or c[0].startswith(tuple(args.paths)))
             and (not args.switch or args.switch in c[-1])]
    def check(case):
        """One case in its own sanitized process -> its verdict line."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("OLSM_MATRIX_")}
        env.update(kv.split("=") for kv in case[-1].split(",") if kv)
        cmd = ["compute-sanitizer", "--tool", "memcheck", "--print-limit", "3", "--error-exitcode", "9",
               sys.executable, __file__, "--case", *map(str, case[:-1]), case[-1] or "-"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
            found = [ln.strip("= ") for ln in r.stdout.splitlines() if "Invalid" in ln or " at " in ln]
            why = " | ".join(found[:2] or [r.stderr[-200:]])
            return "clean" if r.returncode == 0 else f"rc {r.returncode}: {why}"
        except subprocess.TimeoutExpired:
            return "timeout"

    # cases are separate processes sharing the GPU: several at once overlap their compiles
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(check, case): case for case in cases}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="memcheck"):
            verdict = fut.result()
            bad += verdict != "clean"
            lines.append(f"{futures[fut]}  {verdict}")
            tqdm.write(lines[-1])
    pathlib.Path(args.out).write_text("\n".join(lines) + "\n")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
