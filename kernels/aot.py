"""Compile a Triton kernel for a GPU architecture on a machine without one, and read its resources.

Triton's wheel carries ``ptxas`` and ``cuobjdump``, so ``triton.compile`` can lower a kernel to a
cubin for, say, Hopper (sm_90) on a CPU-only machine. That catches what the interpreter
(``TRITON_INTERPRET=1``, how CI runs kernels) cannot: code the compiler rejects, shared memory
beyond the GPU's limit (an ``OutOfResources`` at launch), and register spills — at no GPU time.
``benchmarks/kernel_resources.py`` prints the table for every fused matrix kernel;
``tests/test_kernel_resources.py`` checks the default-path ones compile and fit an H100.
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile
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
        ``{"shared": bytes, "registers": per thread, "stack": spill bytes per thread}``.

    Raises:
        triton.CompilationError (or the compiler's own error) if the kernel does not compile.
    """
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
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(compiled.asm["cubin"])
    try:
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", fh.name], capture_output=True,
                               text=True, check=True).stdout
    finally:
        os.unlink(fh.name)
    field = lambda key: int(re.search(rf"{key}:(\d+)", usage).group(1))  # noqa: E731
    return {"shared": int(compiled.metadata.shared), "registers": field("REG"), "stack": field("STACK")}
