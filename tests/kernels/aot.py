"""Ahead-of-time GPU compilation for the CPU test suite: build Triton kernels for sm_80 / sm_90.

A spec is ``kernels.compile_spec.KernelSpec(name, fn, signature, constexprs, options, must_fit)``.
Compilation runs in a subprocess with TRITON_INTERPRET=0 (the suite's interpreter flag would
otherwise stub the compiler and shrink the kernels' config lists to one tiny config).

``compile_specs`` (used by tests/kernels/test_{moe,mohd}_compile.py) serves its results from the
static-gate cache (tests/kernels/ptxas.py), so the compile tests and the ptxas gate compile each
kernel once per arch between them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARCHS = {80: 163 * 1024, 90: 227 * 1024}  # max dynamic shared memory per block, bytes


def divisibility_attrs(fn, signature: dict, sizes: bool = True) -> dict:
    """The ``tt.divisibility`` attrs the launch-time JIT would attach at training shapes.

    At launch the JIT marks 16-aligned pointers and multiple-of-16 ints as such, which is what
    enables vectorised loads and cp.async/TMA pipelining (and the largest shared-memory use).
    Pointers (torch allocations are 256-byte aligned) and strides always qualify; integer sizes do
    when ``sizes`` is set (MoE/MoHD sizes D, F, E, N are multiples of 16 at training shapes; the
    attention specs leave T/S/H/G unmarked, as tests/kernels/test_attention_compile.py does).
    Float scalars never carry the attr.
    """
    names = list(fn.arg_names)
    marked = [
        a
        for a, ty in signature.items()
        if ty.startswith("*") or a.startswith("stride_") or (sizes and ty in ("i32", "i64"))
    ]
    return {(names.index(a),): [["tt.divisibility", 16]] for a in marked}


def compile_one(spec, cc: int, sizes_divisible: bool = True) -> tuple[dict, str, str | None]:
    """Compile one spec for sm_<cc>: (record, ptx, ptxas log or None).

    The record holds shared bytes and PTX features. ``has_dot``: the kernel issues a matrix multiply
    (``tt.dot`` in its Triton IR), so on Hopper in bf16 it should lower to ``wgmma``; ``tma``: bulk
    tensor copies (a subset of ``cp_async``). The log is Triton's own ``ptxas -v`` output (same
    flags as a GPU build), captured when Triton actually ran ptxas, i.e. not on a Triton cache hit.
    """
    import contextlib
    import io

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = divisibility_attrs(spec.fn, spec.signature, sizes_divisible)
    sig = dict(spec.signature, **{k: "constexpr" for k in spec.constexprs})
    src = ASTSource(fn=spec.fn, signature=sig, constexprs=spec.constexprs, attrs=attrs)
    knobs = getattr(getattr(triton, "knobs", None), "nvidia", None)
    dump = knobs is not None and hasattr(knobs, "dump_ptxas_log")
    out = io.StringIO()
    saved = knobs.dump_ptxas_log if dump else None
    try:
        if dump:  # make_cubin prints its `ptxas -v` log instead of deleting it: saves a second ptxas run
            knobs.dump_ptxas_log = True
        with contextlib.redirect_stdout(out):
            k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(spec.options))
    finally:
        if dump:
            knobs.dump_ptxas_log = saved
    log = out.getvalue()
    ptx = k.asm["ptx"]
    record = {
        "shared": int(k.metadata.shared),
        "wgmma": "wgmma" in ptx,
        "mma_sync": "mma.sync" in ptx,
        "cp_async": "cp.async" in ptx,
        "tma": "cp.async.bulk" in ptx,
        "has_dot": "tt.dot" in k.asm["ttir"],
    }
    return record, ptx, (log if "Used" in log and "registers" in log else None)


def compile_specs(specs, cc: int) -> dict:
    """Compile every spec for compute capability `cc`; name → record ({shared, wgmma, ...} or {error})."""
    from tests.kernels.ptxas import records_for_specs

    return {row["name"]: row for row in records_for_specs(specs, cc)}


def compile_in_subprocess(module: str, cc: int) -> dict:
    """Run ``<module>._compile_all(cc)`` in a fresh interpreter without TRITON_INTERPRET."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    code = f"import json; from {module} import _compile_all; print(json.dumps(_compile_all({cc})))"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
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
