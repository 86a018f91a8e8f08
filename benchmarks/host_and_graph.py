"""Where a call's time goes at small shapes: the host's launch cost against the GPU's work.

``bench_matrix.py`` and ``quick_ab.py`` time eager calls with ``triton.testing.do_bench``: when the
Python wrappers and Triton's launcher take longer to issue a call's kernels than the GPU takes to
run them, that time is the host's, and it moves with the machine's CPU from one process to the
next. For each planned call this prints, side by side:

* ``eager``: median ms of the call as ``bench_matrix`` times it;
* ``graph``: median ms of the same call replayed from a CUDA graph (the GPU's time alone; what a
  user with CUDA graphs or ``torch.compile(mode="reduce-overhead")`` gets);
* ``host``: ms of host time per call: back-to-back calls on a tiny input (B = 1, T = 64, the same
  H and D), synchronised once at the end, so the GPU is idle and the wall time is the host's;
* ``launches``: Triton kernel launches per call (host time grows with them).

``eager`` well above ``graph`` with ``host`` near ``eager`` means the eager number is host-bound.

    python -u benchmarks/host_and_graph.py linear_attention:bwd:8,2048,16,128 longhorn:bwd:8,2048,16,128 [--fla]

(items ``method:fwd|bwd[:B,T,H,D]``, shape (8, 2048, 16, 128) unless given; ``--variants=a,b``
times our call on each of ``bench_matrix``'s variants (e.g. ``new,dwboth``: A/B in CUDA graphs,
where eager rows are host-bound); ``--fla`` adds FLA's
kernel for the same recurrence, where it has one; ``--profile`` adds, per call, the GPU time of
each kernel (``torch.profiler``) and the host's costliest Python functions (``cProfile`` over
the tiny calls); ``--autotune-cache=PATH`` seeds FLA's autotuning from
``autotune_cache.py``'s tar, as in ``bench_matrix.py``). On a CPU it runs each call once, tiny, in the
interpreter, and reports the host column only (the interpreter runs the kernels, so that number
is not a launch cost), to check the calls.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_matrix as BM  # noqa: E402

DEFAULT_SHAPE = (8, 2048, 16, 128)


def parse(items):
    """``method:fwd|bwd[:B,T,H,D]`` -> ``(method, backward, shape)``."""
    plan = []
    for item in items:
        method, mode, *shape = item.split(":")
        if mode not in ("fwd", "bwd"):
            raise SystemExit(f"{item}: the second field is fwd or bwd")
        if method not in BM.METHODS or method == "sdpa":
            raise SystemExit(f"{item}: methods are {', '.join(m for m in BM.METHODS if m != 'sdpa')}")
        plan.append((method, mode == "bwd", tuple(int(n) for n in shape[0].split(",")) if shape else DEFAULT_SHAPE))
    return plan


def step_fn(fn, x, backward):
    """One call (and its backward), as ``bench_matrix.bench`` times it."""
    if not backward:
        def step():
            with torch.no_grad():
                fn(x)
        return step
    d_o = torch.randn_like(fn(x))

    def step():
        for t in x.values():
            t.grad = None
        fn(x).backward(d_o)
    return step


def graph_ms(step, reps: int = 20, rounds: int = 7) -> float:
    """Median ms per call of ``step`` replayed from a CUDA graph (``reps`` calls per replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):    # warm-up off the default stream, as graph capture needs
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            step()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def host_ms(step, calls: int = 50) -> float:
    """Wall ms per call of ``calls`` back-to-back calls, synchronised once (a tiny input: the GPU
    waits on the host)."""
    step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e3


def count_launches(step) -> int:
    """Triton kernel launches of one ``step`` (JIT kernels on a GPU, interpreted ones on a CPU)."""
    from triton.runtime import interpreter, jit

    seen = Counter()
    patched = []
    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        real = cls.run

        def run(self, *args, _real=real, **kwargs):
            seen[1] += 1
            return _real(self, *args, **kwargs)
        cls.run = run
        patched.append((cls, real))
    try:
        step()
    finally:
        for cls, real in patched:
            cls.run = real
    return seen[1]


def profile(step, tiny_step, rows: int = 12) -> None:
    """Print the GPU time per kernel of ``step`` (``torch.profiler``, 10 calls) and the host's
    costliest functions over 50 ``tiny_step`` calls (``cProfile``, own time)."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60))
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(50):
        tiny_step()
    torch.cuda.synchronize()
    pr.disable()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(rows)
    print("\n".join(out.getvalue().splitlines()[:rows + 12]))


def main(argv):
    fla_too = "--fla" in argv
    seed = [a.split("=", 1)[1] for a in argv if a.startswith("--autotune-cache=")]
    if seed:
        import autotune_cache

        autotune_cache.enable(seed[0])
    variants = next((a.split("=", 1)[1].split(",") for a in argv if a.startswith("--variants=")), ["new"])
    for v in variants:
        BM.variant_name(v)
    plan = parse([a for a in argv if not a.startswith("--")]) or parse(["linear_attention:bwd", "longhorn:bwd"])
    saved = dict(os.environ)
    try:
        _run(plan, variants, fla_too, "--profile" in argv)
    finally:    # the variants' switches are process-wide: leave the environment as found
        os.environ.clear()
        os.environ.update(saved)


def _run(plan, variants, fla_too, profile_too):
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    km = BM.import_kernels()
    fla = BM.import_fla() if (fla_too and cuda) else None
    if cuda:
        import triton
        print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for method, backward, shape in plan:
        # (name, variant, call): ours per variant (its call made once the variant is set), then FLA's
        impls = [("ours" if v == "new" else f"ours@{v}", v, None) for v in variants]
        if fla is not None and method in BM.FLA_NAME:
            impls.append(("fla." + BM.FLA_NAME[method], "new", lambda z, m=method: BM.theirs(m, z, fla)))
        B, T, H, D = shape if cuda else (1, 70, 2, 16)
        dtype = torch.bfloat16 if cuda else torch.float32
        big = BM.make_inputs(B, T, H, D, dtype=dtype, device=dev)
        tiny = BM.make_inputs(1, 64, H, D, dtype=dtype, device=dev)
        for name, variant, fn in impls:
            label = f"{method} {'fwd+bwd' if backward else 'fwd'} {name}"
            delta = BM.set_variant(variant)     # its switches, read by our calls while they run
            if fn is None:
                fn = lambda z, m=method, d=delta: BM.ours(m, z, km, d)  # noqa: E731
            try:
                tiny_step = step_fn(fn, tiny, backward)
                host = host_ms(tiny_step, calls=50 if cuda else 2)
                launches = count_launches(tiny_step)
                if cuda:
                    import triton

                    step = step_fn(fn, big, backward)
                    eager = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
                    graph = graph_ms(step)
                    print(f"{label:44s} {shape} eager {eager:.3f} ms | graph {graph:.3f} ms | "
                          f"host {host:.3f} ms/call | {launches} launches", flush=True)
                    if profile_too:
                        profile(step, tiny_step)
                else:
                    print(f"{label:44s} (interpreter) host {host:.1f} ms/call | {launches} launches", flush=True)
            except Exception as err:  # noqa: BLE001 - FLA's refusals are rows too
                print(f"{label:44s} {shape} failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
