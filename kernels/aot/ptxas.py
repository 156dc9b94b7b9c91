"""Static performance gates: compile every Triton kernel spec ahead of time and read ``ptxas -v``.

For each ``KernelSpec`` of ``kernels.{moe,mohd,attention}.aot_specs.aot_specs()`` and each arch
(sm_90a, sm_80) this records registers per thread, spill store/load bytes, shared memory
(``metadata.shared``) and whether the PTX uses wgmma / mma.sync / cp.async. Compiles run in one
subprocess per arch with TRITON_INTERPRET=0 (``python -m kernels.aot.ptxas --cc 90``). The
numbers come from the ``ptxas -v`` log of Triton's own cubin build (captured through
``triton.knobs.nvidia.dump_ptxas_log``, so the flags are exactly a GPU build's); when Triton serves
the kernel from its cache, the wheel's ptxas is run on the PTX with the same flags instead.

Results are cached on disk under ``<repo>/.cache/static-gates/`` (``.cache/`` is git-ignored;
override with ``SPARSE_ARCH_STATIC_CACHE``), one JSON file per key; the key hashes the kernel's
Triton cache key (its source, its ``@triton.jit`` callees' sources and the constexpr globals it
reads), the signature, constexprs, divisibility attrs, options, triton version, arch and ptxas
flags, so a re-run with unchanged kernels only reads files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from kernels.aot.compile import ARCHS, ROOT, compile_one, divisibility_attrs

PACKAGES = ("moe", "mohd", "attention")
SIZES_DIVISIBLE = {"attention": False}  # see aot.divisibility_attrs; default True
CACHE_DIR = Path(os.environ.get("SPARSE_ARCH_STATIC_CACHE", ROOT / ".cache" / "static-gates"))
RECORD_VERSION = 1  # bump when the record's fields change
CCS = tuple(sorted(ARCHS, reverse=True))  # sm_90a first: the training target


def gpu_name(cc: int) -> str:
    """ptxas --gpu-name for a compute capability; Triton targets the arch-specific sm_90a on Hopper."""
    return f"sm_{cc}a" if cc == 90 else f"sm_{cc}"


def ptxas_path() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def ptxas_flags(cc: int) -> list[str]:
    # --regAllocOptLevel=2: triton 3.7's own ptxas call passes it (a ptxas 13.x workaround), so the
    # register counts here are the ones the GPU build gets
    return ["-v", "--regAllocOptLevel=2", f"--gpu-name={gpu_name(cc)}"]


_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def parse_ptxas(log: str) -> dict:
    """Registers (max over functions), spill store/load and stack bytes (summed) from ``ptxas -v``."""
    regs = [int(m) for m in _USED.findall(log)]
    spills = [(int(s), int(ld)) for s, ld in _SPILL.findall(log)]
    if not regs:
        raise ValueError(f"ptxas log has no 'Used N registers' line: {log[-500:]!r}")
    return {
        "registers": max(regs),
        "spill_store_bytes": sum(s for s, _ in spills),
        "spill_load_bytes": sum(ld for _, ld in spills),
        "stack_bytes": sum(int(m) for m in _STACK.findall(log)),
    }


def run_ptxas(ptx: str, cc: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run(
            [str(ptxas_path()), *ptxas_flags(cc), str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas exit {proc.returncode}: {proc.stderr[-1000:]}")
    return parse_ptxas(proc.stdout + proc.stderr)


def package_of(spec) -> str:
    """'moe' for a kernel defined in kernels.moe.grouped_gemm, etc."""
    module = getattr(spec.fn, "module", None) or spec.fn.fn.__module__
    return module.split(".")[1] if module.startswith("kernels.") else module


def tiles_of(spec) -> str:
    """The autotune config in words: tile constexprs, warps, stages ("BLOCK_M=128,BLOCK_N=64,w4,s3")."""
    tiles = [f"{k}={v}" for k, v in spec.constexprs.items() if k.startswith(("BLOCK", "GROUP"))]
    opts = [f"{tag}{spec.options[k]}" for k, tag in (("num_warps", "w"), ("num_stages", "s")) if k in spec.options]
    return ",".join(tiles + opts)


def spec_key(spec, cc: int) -> str:
    """Cache key of one (spec, arch) compile; changes whenever the kernel or its inputs change."""
    import triton

    sizes = SIZES_DIVISIBLE.get(package_of(spec), True)
    parts = {
        "fn": spec.fn.cache_key,
        "fn_name": spec.fn.__name__,
        "signature": spec.signature,
        "constexprs": {k: repr(v) for k, v in sorted(spec.constexprs.items())},
        "attrs": sorted((k[0], repr(v)) for k, v in divisibility_attrs(spec.fn, spec.signature, sizes).items()),
        "options": sorted(spec.options.items()),
        "triton": triton.__version__,
        "cc": cc,
        "ptxas": ptxas_flags(cc),
        "record": RECORD_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()[:32]


def _record(spec, cc: int) -> dict:
    """Compile + ptxas one spec (no cache); errors become {'error': ...} so one bad kernel is reported, not fatal."""
    try:
        record, ptx, log = compile_one(spec, cc, SIZES_DIVISIBLE.get(package_of(spec), True))
        record.update(parse_ptxas(log) if log else run_ptxas(ptx, cc))
    except Exception as exc:  # noqa: BLE001 - reported per kernel by the gate
        record = {"error": f"{type(exc).__name__}: {str(exc)[:600]}"}
    return record


def records_for_specs(specs, cc: int, use_cache: bool = True) -> list[dict]:
    """One row per spec: name, package, must_fit, cc, cached, and the record (or 'error')."""
    rows = []
    for spec in specs:
        key = spec_key(spec, cc)
        path = CACHE_DIR / f"{key}.json"
        cached = use_cache and path.exists()
        if cached:
            record = json.loads(path.read_text())
        else:
            record = _record(spec, cc)
            if "error" not in record:  # failures are retried on the next run
                CACHE_DIR.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(record))
                os.replace(tmp, path)  # atomic: parallel runs never read half a file
        rows.append(
            {
                "name": spec.name,
                "package": package_of(spec),
                "must_fit": bool(spec.must_fit),
                "cc": cc,
                "cached": cached,
                "tiles": tiles_of(spec),
                **record,
            }
        )
    return rows


def all_specs(packages=PACKAGES) -> list:
    """Every KernelSpec of the given kernel packages (needs TRITON_INTERPRET=0 for the GPU config lists)."""
    import importlib

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("all_specs() needs TRITON_INTERPRET=0 (the interpreter shrinks the config lists)")
    specs = []
    for pkg in packages:
        specs += importlib.import_module(f"kernels.{pkg}.aot_specs").aot_specs()
    return specs


def static_records(ccs=CCS, packages=PACKAGES, use_cache: bool = True, timeout: float = 900) -> list[dict]:
    """Rows for every spec × arch, one subprocess per arch running in parallel (compiles are single-threaded)."""
    env = dict(
        os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    procs = {}
    for cc in ccs:
        cmd = [sys.executable, "-m", "kernels.aot.ptxas", "--cc", str(cc), "--packages", *packages]
        if not use_cache:
            cmd.append("--no-cache")
        procs[cc] = subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rows = []
    for cc, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"static records for sm_{cc} failed (exit {proc.returncode}):\n{stderr[-3000:]}")
        rows += json.loads(stdout.strip().splitlines()[-1])
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", type=int, required=True, choices=sorted(ARCHS))
    parser.add_argument("--packages", nargs="+", default=list(PACKAGES), choices=PACKAGES)
    parser.add_argument("--no-cache", action="store_true")
    args = parser.parse_args(argv)
    rows = records_for_specs(all_specs(args.packages), args.cc, use_cache=not args.no_cache)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
