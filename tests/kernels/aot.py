"""Ahead-of-time GPU compilation for the CPU test suite: build Triton kernels for sm_80 / sm_90.

A spec is (name, jit function, signature, constexprs, compile options). Compilation runs in a
subprocess with TRITON_INTERPRET=0 (the suite's interpreter flag would otherwise stub the compiler).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARCHS = {80: 163 * 1024, 90: 227 * 1024}  # max dynamic shared memory per block, bytes


def compile_specs(specs, cc: int) -> dict:
    """Compile every spec for compute capability `cc`; returns name → {shared, wgmma} or {error}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = {}
    for name, fn, sig, consts, opts in specs:
        # At launch the JIT marks 16-aligned pointers and multiple-of-16 ints as such, which is what
        # enables cp.async/TMA pipelining (and the largest shared-memory use): mimic that here.
        names = list(fn.arg_names)
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in sig}
        sig = dict(sig, **{k: "constexpr" for k in consts})
        try:
            src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
            k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)
            results[name] = {"shared": k.metadata.shared, "wgmma": "wgmma" in k.asm["ptx"]}
        except Exception as exc:  # reported per kernel by the test
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
    return results


def compile_in_subprocess(module: str, cc: int) -> dict:
    """Run ``<module>._compile_all(cc)`` in a fresh interpreter without TRITON_INTERPRET."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    code = f"import json; from {module} import _compile_all; print(json.dumps(_compile_all({cc})))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
