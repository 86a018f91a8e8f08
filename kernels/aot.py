"""Compile a Triton kernel for a GPU architecture on a machine without one, and read its resources.

Triton's wheel carries ``ptxas`` and ``cuobjdump``, so ``triton.compile`` can lower a kernel to a
cubin for, say, Hopper (sm_90) on a CPU-only machine. That catches what the interpreter
(``TRITON_INTERPRET=1``, how CI runs kernels) cannot: code the compiler rejects, shared memory
beyond the GPU's limit (an ``OutOfResources`` at launch), and register spills — at no GPU time.
``benchmarks/kernel_resources.py`` prints the table for every fused matrix kernel;
``tests/test_kernel_resources.py`` checks the default-path ones compile and fit an H100.
:func:`loop_mix` counts a kernel's main-loop SASS instructions (a walk's issue slots per chunk).
All of it compiles with the Triton that is imported, which may differ from the GPU machine's.
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile
from collections import Counter
from typing import Dict

import triton

HOPPER_SHARED_BYTES = 232448  # per block, opt-in maximum on H100/H200 (227 KB)


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_for(kernel, constexprs: Dict[str, object], types: Dict[str, str], *, arch: int = 90,
                num_warps: int = 4, num_stages: int = 3) -> Dict[str, int]:
    """Compile ``kernel`` (a ``@triton.jit`` function) for ``sm_{arch}`` and report its resources.

    Args:
        kernel: the jitted kernel.
        constexprs: value of every ``tl.constexpr`` parameter (defaults of the kernel are used for
            the ones left out).
        types: Triton type of the other parameters by name (``"*bf16"``, ``"*fp32"``, ``"i32"``,
            ``"fp32"``); a parameter not named is taken as ``"*fp32"``.
        arch: compute capability × 10 (90: Hopper).
        num_warps, num_stages: launch options, as at the real launch.

    Returns:
        ``{"shared": bytes, "registers": per thread, "stack": spill bytes per thread,
        "sync_loads": loads in loops left synchronous}`` (:func:`synchronous_loop_loads`).

    Raises:
        triton.CompilationError (or the compiler's own error) if the kernel does not compile.
    """
    compiled = _compile(kernel, constexprs, types, arch, num_warps, num_stages)
    usage = _cuobjdump(compiled, "--dump-resource-usage")
    field = lambda key: int(re.search(rf"{key}:(\d+)", usage).group(1))  # noqa: E731
    return {"shared": int(compiled.metadata.shared), "registers": field("REG"), "stack": field("STACK"),
            "sync_loads": synchronous_loop_loads(compiled.asm["ttgir"])}


def _cuobjdump(compiled, flag: str) -> str:
    """``cuobjdump flag`` of a compiled kernel's cubin (written to a temporary file)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(compiled.asm["cubin"])
    try:
        return subprocess.run([_tool("cuobjdump"), flag, fh.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(fh.name)


def _compile(kernel, constexprs, types, arch, num_warps, num_stages):
    """``triton.compile`` of ``kernel`` for ``sm_{arch}`` with the launcher's specialisation."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = inspect.signature(kernel.fn).parameters
    signature, constants = {}, {}
    for i, (name, p) in enumerate(params.items()):
        is_const = "constexpr" in str(p.annotation)
        if is_const:
            signature[name] = "constexpr"
            constants[(i,)] = constexprs[name] if name in constexprs else p.default
        else:
            signature[name] = types.get(name, "*fp32")
    # as the launcher specialises them: torch allocations are 16-byte aligned, so every pointer
    # is marked divisible by 16 (without this, loads and atomics compile unvectorised and the
    # register counts do not match the real launch)
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if t.startswith("*")}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def loop_mix(kernel, constexprs: Dict[str, object], types: Dict[str, str], *, arch: int = 90,
             num_warps: int = 4, num_stages: int = 3) -> Dict[str, int]:
    """SASS instruction mix of the largest loop of ``kernel`` compiled for ``sm_{arch}`` (the loop
    between the farthest backward branch and its target): per warp, per iteration. On a walk that
    is the work per chunk, so warps × ``total`` is the issue slots a chunk needs (run 16: the gated
    reverse pass's 8 × 1278 against DeltaNet's 4 × 754 is how its fp32 copies were found).

    Returns:
        ``{"total": n, opcode: count, ...}``, opcodes without their modifiers, most frequent first.
    """
    sass = _cuobjdump(_compile(kernel, constexprs, types, arch, num_warps, num_stages), "-sass")
    ins = [(int(a, 16), full, op) for a, full, op in
           re.findall(r"/\*([0-9a-f]{4,})\*/\s+((?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)[^;]*);", sass)]
    loop = None
    for addr, full, op in ins:
        m = re.search(r"0x([0-9a-f]+)", full) if op.startswith("BRA") else None
        if m and int(m.group(1), 16) < addr and (loop is None or addr - int(m.group(1), 16) > loop[1] - loop[0]):
            loop = (int(m.group(1), 16), addr)
    if loop is None:
        return {"total": 0}
    counts = Counter(op.split(".")[0] for addr, _, op in ins if loop[0] <= addr <= loop[1])
    return {"total": sum(counts.values()), **dict(counts.most_common())}


_LOAD = re.compile(r"^(%[\w#]+)(?::\d+)? = tt\.load ")


def _carried(line: str, use: "re.Pattern", top: bool) -> bool:
    """Whether this use carries a loaded value out of the iteration unused (a hand prefetch, whose
    latency overlaps the work before its real use): the loop body's own ``scf.yield`` (``top``:
    not the yield of an ``scf.if`` inside it, whose result is used in this iteration), or the
    ``iter_args`` of a nested loop (not its bounds)."""
    if line.startswith("scf.yield"):
        return top
    m = re.match(r"^(?:%[\w#]+(?::\d+)? = )?scf\.for .*?iter_args\((.*)\)", line)
    return m is not None and use.search(m.group(1)) is not None and use.search(line[:m.start(1)]) is None


def _defines(line: str, name: str) -> bool:
    return re.match(re.escape(name) + r"(?::\d+)? = ", line) is not None


def synchronous_loop_loads(ttgir: str) -> int:
    """Loads in a loop of a kernel's TTGIR (after software pipelining) that wait for memory in the
    iteration that issues them: plain ``tt.load`` ops whose result is used in that iteration.

    Triton's pipeliner turns the loads it prefetches into ``ttg.async_copy_global_to_local``; it
    prefetches a loop's dot operands (A and B, not the accumulator), so a load feeding a dot only
    through its accumulator or through other arithmetic stays a ``tt.load``: on a sequential walk
    that is a memory latency per step (run 15, H200: the forward walk's Y with a pair; loading it a
    chunk ahead took DeltaNet's forward from 1.694 to 1.581 ms at (1, 32768)). A load whose result
    only goes to the loop body's own ``scf.yield`` (or a nested loop's ``iter_args``) is a prefetch
    by hand for the next iteration and is not counted. ``scf.while`` loops are not examined (the
    kernels here have none).

    Args:
        ttgir: ``compiled.asm["ttgir"]`` of a compiled kernel.

    Returns:
        the number of such loads.
    """
    lines = [line.strip() for line in ttgir.splitlines()]
    stack, loops, count = [], [], 0     # open regions (True: an scf.for body), open loops' first lines
    for i, line in enumerate(lines):
        if line.startswith("}"):
            if stack.pop():
                start = loops.pop()
                count += _sync_loads(lines[start:i])
        if line.endswith("{"):
            is_for = "scf.for " in line
            stack.append(is_for)
            if is_for:
                loops.append(i + 1)
    return count


def _sync_loads(body) -> int:
    """:func:`synchronous_loop_loads` of one loop body's lines (nested loops are counted on their own)."""
    # each line's regions open inside the body (True: a nested loop), as its line is read
    depth, nested = [], []
    for line in body:
        if line.startswith("}"):
            nested.pop()
        depth.append(tuple(nested))
        if line.endswith("{"):
            nested.append("scf.for " in line)
    n = 0
    for i, line in enumerate(body):
        m = _LOAD.match(line) if not any(depth[i]) else None
        if m:
            name = m.group(1)
            use = re.compile(re.escape(name) + r"(?![\w#])")
            # uses after the load (names are reused in sibling regions), not redefinitions; a
            # conditional prefetch whose name returns in a sibling region may be counted (an
            # overcount fails loudly, an undercount would hide a load)
            uses = [j for j in range(i + 1, len(body)) if use.search(body[j]) and not _defines(body[j], name)]
            n += any(not _carried(body[j], use, not depth[j]) for j in uses)
    return n
