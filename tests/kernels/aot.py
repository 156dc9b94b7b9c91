"""Ahead-of-time GPU compile helpers for the CPU test suite (the machinery is ``kernels.aot``).

``compile_specs`` (used by tests/kernels/test_{moe,mohd}_compile.py) serves its results from the
static-gate cache (``kernels.aot.ptxas``), so the compile tests and the ptxas gate compile each
kernel once per arch between them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from kernels.aot.compile import ARCHS, ROOT
from kernels.aot.ptxas import records_for_specs

__all__ = [
    "ARCHS",
    "ROOT",
    "assert_bf16_gemms_use_wgmma",
    "assert_compiled_and_fit",
    "compile_in_subprocess",
    "compile_specs",
]


def compile_specs(specs, cc: int) -> dict:
    """Compile every spec for compute capability `cc`; name → record ({shared, wgmma, ...} or {error})."""
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
