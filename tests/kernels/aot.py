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
    for name, fn, sig, consts, opts, _must_fit in specs:
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


def assert_compiled_and_fit(results: dict, cc: int, n_specs: int) -> None:
    """Every spec compiled for sm_<cc> and its shared memory fits the device."""
    assert len(results) == n_specs
    errors = {name: r["error"] for name, r in results.items() if "error" in r}
    assert not errors, f"sm_{cc} compile failures: {errors}"
    too_big = {name: r["shared"] for name, r in results.items() if r["shared"] > ARCHS[cc]}
    assert not too_big, f"sm_{cc} shared memory over {ARCHS[cc]} bytes: {too_big}"


def assert_bf16_gemms_use_wgmma(results: dict) -> None:
    """On sm_90 the bf16 matmul kernels must lower to wgmma (fp32 'ieee' kernels use FMA)."""
    gemms = {name: r for name, r in results.items() if "bf16]" in name and "error" not in r}
    assert gemms and all(r["wgmma"] for r in gemms.values()), {n: r["wgmma"] for n, r in gemms.items()}
