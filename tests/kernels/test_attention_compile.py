"""Ahead-of-time GPU compile check for every attention Triton kernel (no GPU needed).

The interpreter runs kernels on CPU but does not prove they build for a GPU (layouts, shared
memory, dot shapes). Each kernel is compiled for sm_80 and sm_90 at every block config the
autotuner can pick on a GPU, at head dim 128 in bf16 (the largest shared-memory footprint of
the 16-bit dtypes), plus the first config at d=64 and at a masked d=80, and the small fallback
config in fp32 at d=128. Every 16-bit compile must fit the device's shared memory; in fp32 the
autotuner skips configs that do not fit, so only the fallback must fit. Compiles run in one
subprocess per arch (in parallel) with TRITON_INTERPRET=0, so the modules expose real
JITFunctions and the GPU config lists.
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
EXTRA_DIMS = (64, 80)  # 80: a head dim padded to 128 (masked loads)


def _sig(fn, dt: str, ints: tuple[str, ...], fp32_ptrs: tuple[str, ...]) -> dict:
    """Signature for all runtime args: pointers in `dt` except int maps / fp32 buffers, scalars."""
    sig = {}
    for name in fn.arg_names:
        if name in ("pos_ptr", "k_head_ptr", "v_head_ptr", "order_ptr", "offsets_ptr"):
            sig[name] = "*i32"
        elif name in fp32_ptrs:
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dt}"
        elif name in ("scale_log2", "scale"):
            sig[name] = "fp32"
        elif name in ints or name.startswith("stride_"):
            sig[name] = "i32"
    return sig


def _specs():
    """(name, kernel, signature, constexprs, options, must_fit) for every compile."""
    from kernels.attention import flash as fw
    from kernels.attention import flash_bwd as bw

    out = []
    kernels = [
        ("fwd", fw._attn_fwd.fn, fw.FWD_CONFIGS, {}, ("T", "S", "H"), ("lse_ptr",)),
        ("dq", bw._attn_bwd_dq.fn, bw.DQ_CONFIGS, {}, ("T", "S", "H"), ("lse_ptr", "delta_ptr")),
        ("dkdv", bw._attn_bwd_dkdv.fn, bw.DKDV_CONFIGS, {"DO_DK": True, "DO_DV": True}, ("T", "S", "H", "G"),
         ("lse_ptr", "delta_ptr")),
    ]
    for kname, fn, configs, flags, ints, f32 in kernels:
        for i, cfg in enumerate(configs):
            runs = [("bf16", 128, flags)]
            if i == 0:
                runs += [("bf16", d, flags) for d in EXTRA_DIMS]
                if kname == "dkdv":  # the decoupled-map launches: dK only, dV only
                    runs += [("bf16", 128, {"DO_DK": True, "DO_DV": False}),
                             ("bf16", 128, {"DO_DK": False, "DO_DV": True})]
            if i == len(configs) - 1:
                runs.append(("fp32", 128, flags))
            for dt, d, fl in runs:
                consts = dict(D=d, DV=d, CAUSAL=True, HAS_POS=True, BLOCK_D=fw.block_dim(d), BLOCK_DV=fw.block_dim(d),
                              **fl, **cfg.kwargs)
                opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                tag = ",".join(f"{k}={v}" for k, v in fl.items())
                must_fit = dt != "fp32" or i == len(configs) - 1
                out.append((f"{kname}[cfg{i},{dt},d={d}{',' + tag if tag else ''}]", fn, _sig(fn, dt, ints, f32),
                            consts, opts, must_fit))
    delta_consts = {"DV": 128, "BLOCK_DV": 128, "BLOCK_M": bw.DELTA_BLOCK_M}
    out.append(("delta[bf16]", bw._attn_bwd_delta, _sig(bw._attn_bwd_delta, "bf16", ("T", "H"), ("delta_ptr",)),
                delta_consts, {}, True))
    return out


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
        attrs = {(names.index(a),): [["tt.divisibility", 16]]
                 for a in sig if a.endswith("_ptr") or a.startswith("stride_")}
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
        code = ("import json; from tests.kernels.test_attention_compile import _compile_all; "
                f"print(json.dumps(_compile_all({cc})))")
        procs[cc] = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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
