"""The fused matrix kernels (and the generated elementwise ones, without spills) compile for Hopper
(sm_90) and fit its shared memory — checked on the
CPU with Triton's bundled ptxas (``olsm.kernels.aot``), so a change that only the GPU compiler
rejects, or that needs more than 227 KB of shared memory, fails here and not on a user's GPU."""
import os
import pathlib
import platform
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bundled_tools() -> bool:
    import triton

    bin_dir = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return all((bin_dir / tool).exists() for tool in ("ptxas", "cuobjdump"))


def _resources(*args):
    """``benchmarks/kernel_resources.py args`` in a fresh process: the suite runs kernels in the
    interpreter (TRITON_INTERPRET=1), and an interpreted function cannot be compiled."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(platform.machine() != "x86_64" or not _bundled_tools(),
                    reason="needs the ptxas and cuobjdump that Triton bundles on x86_64")
def test_default_path_kernels_compile_for_hopper_and_fit():
    run = _resources("--default-only")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| fwd") or line.startswith("| bwd")]
    # 16 launches × 2 decays (the 5 rank-0 split launches only without decay: OLSM_MATRIX_STATE=auto
    # splits no other rank-0 pass) + the decay gradient's 3 + 13 per-key (GLA) + 10 per-key with a pair (DPLR);
    # both per-key families have whole-chunk and sub-block kernels for their Grams and intra backward;
    # + the scalar decay's two walks at 32-key blocks (few programs: sequence_launch narrows them)
    # + the forward walk without a decay at 64-key blocks and its 2 segment walks (the same, at
    # BK_walk_fwd_min); exit code 0: every default-path launch fits
    assert len(rows) == 58
    # 9 × 2 decays, and without a decay the forward's split (two segment walks and the join: auto
    # splits the delta form's forward at few programs)
    assert len([line for line in run.stdout.splitlines() if line.startswith("| delta")]) == 21
    # the generated elementwise kernels at their default tiles: compiled, and no register spills
    # (forward, backward) × 2 models, and each model's launches at few programs per SM (compiled;
    # allowed to spill): the forward's doubled block, the backward split and its carry pass, and
    # the carry fold (one kernel for every model); the forward's opt-in split phases are not on
    # the default path. Plus each model's gradient-slab backward, which slab="auto" takes where it
    # spills at most GRADS_MAX_SPILL bytes: mamba1 (88 B on Triton 3.9, 192 on 3.6), not
    # longhorn_diag (824 / 624 B)
    ew = [line for line in run.stdout.splitlines() if line.startswith("| elementwise")]
    assert len(ew) == 13 and sum("| few programs |" in line for line in ew) == 7
    grads = {line.split("|")[1].split()[2]: line.split("|")[2].strip() for line in ew if "grads slab" in line}
    assert grads == {"mamba1": "auto: yes", "longhorn_diag": "auto: no (spills)"}
    # the sequential walks (forward state, reverse dS) on the default path leave no load in their
    # loop synchronous: on a walk each is a memory latency per chunk (run 15: the forward walk's Y
    # was; its load a chunk ahead took DeltaNet's forward 1.694 -> 1.581 ms). Except a per-key γ in
    # two walks (the forward one with a pair, the reverse one without): loaded a chunk ahead by hand
    # they measured slower on the H200 (run 16: DPLR's forward 4.89 -> 5.16 ms, GLA's fwd+bwd 5.41
    # -> 5.47), so they load it where they use it, exactly once per chunk
    walks = [line for line in rows + [line for line in run.stdout.splitlines() if line.startswith("| delta")]
             if line.startswith(("| fwd state", "| bwd dstate", "| delta fwd state", "| delta bwd dstate"))]
    assert len(walks) >= 20
    allowed = {"fwd state per-key pair": 1, "bwd dstate per-key": 1}     # at most (a later Triton may prefetch it)
    cells = [[c.strip() for c in line.strip(" |").split("|")] for line in walks]
    sync = [" | ".join(c) for c in cells if int(c[-1]) > allowed.get(c[0], 0)]
    assert not sync, "\n".join(sync)


@pytest.mark.skipif(platform.machine() != "x86_64" or not _bundled_tools(),
                    reason="needs the ptxas and cuobjdump that Triton bundles on x86_64")
def test_loop_mix_of_a_walk():
    # kernel_resources.py --loop: the SASS instruction mix of a walk's loop (aot.loop_mix), the
    # count that found the gated reverse pass's fp32 copies (run 16)
    import re

    run = _resources("--loop", "delta bwd dstate decay=0", "BV=32", "warps=4")
    assert run.returncode == 0, run.stderr[-3000:]
    m = re.search(r"4 warps: (\d+) instructions per warp per iteration, (\d+) per iteration; (.*)", run.stdout)
    assert m, run.stdout
    assert 4 * int(m.group(1)) == int(m.group(2)) and int(m.group(1)) > 100
    assert "HGMMA" in m.group(3)          # the walk's dots are in the loop (wgmma on sm_90)
    # a generated elementwise kernel's row too (its block loop: shuffles for the sums over K and V)
    ew = _resources("--loop", "elementwise bwd mamba1 [8,16,4]")
    assert ew.returncode == 0 and "SHFL" in ew.stdout, ew.stdout + ew.stderr[-3000:]
    bad = _resources("--loop", "no such row")
    assert bad.returncode != 0 and "no row named" in bad.stderr


def test_no_tl_trans_in_kernels():
    # DESIGN §7: tl.trans of an MMA-layout result gave wrong gradients on Hopper with Triton 3.6
    # (FLA issue #640); our kernels load transposed operands transposed instead
    offenders = []
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if "tl.trans(" in code:
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_synchronous_loop_loads_counts_only_loads_used_in_their_own_iteration():
    # TTGIR shapes as Triton prints them after pipelining (names reused in sibling regions)
    from olsm.kernels.aot import synchronous_loop_loads

    ttgir = """
    %a = tt.load %p : tensor<64x!tt.ptr<f32>, #blocked>
    %r:2 = scf.for %i = %c0 to %n step %c1 iter_args(%s = %z, %y = %a) -> (tensor<64xf32>, tensor<64xf32>) {
      %x = tt.load %q : tensor<64x!tt.ptr<f32>, #blocked> loc(#loc3)
      %t = arith.addf %s, %x : tensor<64xf32>
      %ynext = tt.load %w : tensor<64x!tt.ptr<f32>, #blocked>
      %b = ttg.async_copy_global_to_local %v, %buf : tensor<64x!tt.ptr<f32>> -> <64xf32>
      %first = tt.load %u : tensor<8x!tt.ptr<f32>, #blocked>
      %in:1 = scf.for %j = %c0 to %m step %c1 iter_args(%f = %first) -> (tensor<8xf32>) {
        %g = tt.load %h : tensor<8x!tt.ptr<f32>, #blocked>
        %f2 = arith.mulf %f, %g : tensor<8xf32>
        scf.yield %f2 : tensor<8xf32>
      } loc(#loc9)
      scf.if %cond {
        %k = tt.load %e : tensor<64x!tt.ptr<f32>, #blocked>
        tt.store %o, %k : tensor<64x!tt.ptr<f32>, #blocked>
      } else {
        %k = arith.constant dense<0.0> : tensor<64xf32>
      }
      %sel = scf.if %c2 -> (tensor<64xf32>) {
        %z = tt.load %zp : tensor<64x!tt.ptr<f32>, #blocked>
        scf.yield %z : tensor<64xf32>
      } else {
        scf.yield %cst : tensor<64xf32>
      }
      %nb = tt.load %np : !tt.ptr<i32>
      %in2 = scf.for %j2 = %c0 to %nb step %c1 iter_args(%ff = %sel) -> (tensor<64xf32>) {
        scf.yield %ff : tensor<64xf32>
      }
      scf.yield %t, %ynext : tensor<64xf32>, tensor<64xf32>
    } loc(#loc7)
    """
    # %x (used by the add), %g (the nested loop's own step), %k (inside an scf.if), %z (yielded by
    # an scf.if, whose result this iteration uses) and %nb (a nested loop's bound) wait in their
    # iteration; %a is outside any loop, %ynext only goes to the loop's scf.yield and %first only
    # into a nested loop's iter_args (prefetches by hand)
    assert synchronous_loop_loads(ttgir) == 5
    assert synchronous_loop_loads(ttgir.replace("%t = arith.addf %s, %x", "%t = arith.addf %s, %s")) == 4
