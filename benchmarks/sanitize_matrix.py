"""Run the fused matrix kernels (forward and backward) under ``compute-sanitizer --tool memcheck``.

A Triton miscompile can read shared memory past a buffer without failing a numerical test: on an
H200 with Triton 3.6, value blocks of 16 / 32 next to 64-key rows did, and faulted only in some
processes (``fused.launch_shape``). Each case runs in its own process (a fault poisons the CUDA
context), small enough that the sanitizer's slowdown stays in seconds; compiles dominate.

    python -u benchmarks/sanitize_matrix.py [--out benchmarks/results/matrix_sanitizer.txt]

Cases: ``(path, K, V, dtype, decay, heads, storage_dots)``; path ``delta`` is ``chunk_delta``
(with ``u_scale``), ``pair`` is ``chunk_matrix`` with the pair ``(−c k, k)``, ``rank0`` has no
low-rank part. Four heads at B = 2 give few programs, so the sequential passes take their
narrowest blocks (``sequence_launch``); twenty keep the wide ones.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys

import torch
from tqdm import tqdm

CASES = [
    ("delta", 64, 16, "bf16", 0, 4, 0), ("delta", 64, 16, "bf16", 1, 4, 1), ("delta", 64, 32, "bf16", 1, 4, 0),
    ("delta", 32, 16, "bf16", 1, 4, 1), ("delta", 128, 128, "bf16", 1, 4, 1), ("delta", 128, 128, "bf16", 1, 20, 0),
    ("delta", 100, 72, "bf16", 1, 4, 1), ("delta", 64, 64, "fp16", 1, 4, 1), ("delta", 128, 128, "fp32", 1, 4, 0),
    ("rank0", 128, 128, "bf16", 1, 4, 1), ("rank0", 64, 16, "bf16", 1, 4, 1), ("pair", 64, 16, "bf16", 1, 4, 0),
    ("pair", 32, 32, "bf16", 1, 4, 0), ("pair", 128, 128, "bf16", 1, 20, 0),
]
DTYPES = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)


def run_case(path: str, K: int, V: int, dtype: str, decay: int, H: int) -> None:
    """One forward and backward of ``path`` at B = 2, T = 130 (three chunks, the last short)."""
    from olsm.kernels.matrix import chunk_delta, chunk_matrix

    dt, B, T = DTYPES[dtype], 2, 130
    gen = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    q, u = rand(B, T, H, K).to(dt).requires_grad_(), rand(B, T, H, V).to(dt).requires_grad_()
    k = torch.nn.functional.normalize(rand(B, T, H, K), dim=-1).to(dt).requires_grad_()
    c, s = (torch.rand(B, T, H, device="cuda", generator=gen).requires_grad_() for _ in range(2))
    ld = (-0.5 * torch.rand(B, T, H, device="cuda", generator=gen)).requires_grad_() if decay else None
    h0 = rand(B, H, K, V).requires_grad_()
    kw = dict(scale=K ** -0.5, initial_state=h0, output_final_state=True)
    if path == "delta":
        o, S = chunk_delta(q, k, u, c, ld, u_scale=s, **kw)
    else:
        pairs = [((-c[..., None] * k.float()).to(dt), k)] if path == "pair" else []
        o, S = chunk_matrix(q, k, u, ld, pairs, **kw)
    (o.float().sum() + S.sum()).backward()
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "matrix_sanitizer.txt"))
    ap.add_argument("--case", nargs=7, help=argparse.SUPPRESS)      # the child process
    args = ap.parse_args()
    if args.case:
        path, K, V, dtype, decay, H, _ = args.case
        run_case(path, int(K), int(V), dtype, int(decay), int(H))
        return
    lines, bad = [f"# compute-sanitizer memcheck, {torch.cuda.get_device_name()}, torch {torch.__version__}"], 0
    for case in tqdm(CASES, desc="memcheck"):
        env = dict(os.environ, OLSM_MATRIX_DOTS="storage" if case[-1] else "fp32")
        cmd = ["compute-sanitizer", "--tool", "memcheck", "--print-limit", "3", "--error-exitcode", "9",
               sys.executable, __file__, "--case", *map(str, case)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
            found = [ln.strip("= ") for ln in r.stdout.splitlines() if "Invalid" in ln or " at " in ln]
            verdict = "clean" if r.returncode == 0 else f"rc {r.returncode}: " + " | ".join(found[:2] or [r.stderr[-200:]])
        except subprocess.TimeoutExpired:
            verdict = "timeout"
        bad += verdict != "clean"
        lines.append(f"{case}  {verdict}")
        tqdm.write(lines[-1])
    pathlib.Path(args.out).write_text("\n".join(lines) + "\n")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
