"""Ahead-of-time GPU compile check for every attention Triton kernel (no GPU needed).

The interpreter runs kernels on CPU but does not prove they build for a GPU (layouts, shared
memory, dot shapes). Each kernel is compiled for sm_80 and sm_90 at every block config the
autotuner can pick on a GPU (configs are pruned by head dim: kernels.attention.flash.configs_for),
in bf16 at head dims 64 and 128 (default positions; explicit q_positions and a masked d=80 too),
the decoupled-map dK-only / dV-only launches, and fp32 at d=128. Every 16-bit compile must fit
the device's shared memory; in fp32 the autotuner skips configs that do not fit, so only the
small fallback config must fit. The specs come from kernels/attention/aot_specs.py (shared with
the ptxas spill gate). Compiles run in one subprocess per arch (in parallel) with
TRITON_INTERPRET=0, so the modules expose real JITFunctions and the GPU config lists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARCHS = {80: 163 * 1024, 90: 227 * 1024}  # max dynamic shared memory per block, bytes


from kernels.attention.aot_specs import aot_specs as _specs  # noqa: E402


def _compile_all(cc: int) -> dict:
    """Compile every spec for compute capability `cc`; name → {shared, must_fit} or {error}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = {}
    for name, fn, sig, consts, opts, must_fit in _specs():
        # At launch the JIT marks 16-aligned pointers and multiple-of-16 ints (strides of 16-wide
        # heads) as such, which enables vectorised loads and cp.async pipelining: mimic that here.
        names = list(fn.arg_names)
        attrs = {
            (names.index(a),): [["tt.divisibility", 16]] for a in sig if a.endswith("_ptr") or a.startswith("stride_")
        }
        full_sig = dict(sig, **{k: "constexpr" for k in consts})
        try:
            src = ASTSource(fn=fn, signature=full_sig, constexprs=consts, attrs=attrs)
            k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)
            results[name] = {"shared": k.metadata.shared, "must_fit": must_fit}
        except Exception as exc:  # reported per kernel by the test
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
    return results


@pytest.fixture(scope="module")
def compiled():
    """Both archs compile in parallel subprocesses (each is single-threaded LLVM work)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    procs = {}
    for cc in sorted(ARCHS):
        code = (
            "import json; from tests.kernels.test_attention_compile import _compile_all; "
            f"print(json.dumps(_compile_all({cc})))"
        )
        procs[cc] = subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    results = {}
    for cc, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        results[cc] = json.loads(stdout.strip().splitlines()[-1])
    return results


@pytest.mark.parametrize("cc", sorted(ARCHS))
def test_every_attention_kernel_compiles_and_fits_shared_memory(compiled, cc):
    results = compiled[cc]
    assert len(results) == len(_specs())
    errors = {name: r["error"] for name, r in results.items() if "error" in r}
    assert not errors, f"sm_{cc} compile failures: {errors}"
    too_big = {name: r["shared"] for name, r in results.items() if r["must_fit"] and r["shared"] > ARCHS[cc]}
    assert not too_big, f"sm_{cc} shared memory over {ARCHS[cc]} bytes: {too_big}"
