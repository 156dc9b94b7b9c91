"""Ahead-of-time GPU compilation of one kernel spec for sm_80 / sm_90, on a machine without a GPU.

A spec is ``kernels.compile_spec.KernelSpec(name, fn, signature, constexprs, options, must_fit)``.
Compile with TRITON_INTERPRET=0 (the interpreter flag stubs the compiler and shrinks the kernels'
config lists to one tiny config): ``kernels.aot.ptxas`` runs these compiles in a subprocess per arch.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
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
