"""The prepared GPU suite cannot rot: its --dry-run runs every section on CPU (Triton interpreter, tiny
shapes) and must produce each CSV with no error rows; the target bookkeeping is checked on made-up rows."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.gpu_suite import BUDGET_S, Suite, check_targets

ROOT = Path(__file__).resolve().parents[2]


def _read(out: Path, section: str) -> list[dict]:
    with open(out / f"gpu_suite_{section}.csv") as f:
        return list(csv.DictReader(f))


def test_dry_run_runs_every_section(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_suite", "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {s: _read(tmp_path, s) for s in (*BUDGET_S, "targets")}
    errors = {s: [(r["case"], r["error"]) for r in rs if r.get("error")] for s, rs in rows.items()}
    assert not any(errors.values()), errors
    assert all(r["device"] and r["torch"] == torch.__version__ for rs in rows.values() for r in rs)

    acc = rows["accuracy"]
    assert {r["kernel"] for r in acc} == {"expert_mlp", "attention"} and len(acc) == 9
    assert all(r["passed"] == "True" for r in acc), acc
    perf = {(r["kernel"], r["method"]): r for r in rows["perf"]}
    assert {("expert_mlp", "triton"), ("expert_mlp", "dense"), ("attention", "triton")} <= set(perf)
    ours = perf[("expert_mlp", "triton")]
    assert float(ours["ms"]) > 0 and float(ours["vs_dense"]) > 0 and ours["autotune_winner"]
    assert float(perf[("attention", "triton")]["tflops"]) > 0
    total = next(r for r in rows["syncs"] if r["phase"] == "step total")
    assert int(total["host_reads"]) >= 0 and int(total["sync_warnings"]) == 0  # no CUDA: nothing to warn about
    assert {r["case"] for r in rows["graph_breaks"]} == {"expert_mlp", "attention", "MoE LM loss"}
    assert all(int(r["graphs"]) >= 1 for r in rows["graph_breaks"])
    assert float(rows["mfu"][0]["tokens_per_s"]) > 0
    assert [r["status"] for r in rows["targets"]] == ["n/a (dry run)"] * 4


def test_targets_met_and_not_met():
    suite = Suite(torch.device("cpu"), torch.bfloat16, dry=False)
    suite.add("perf", kernel="expert_mlp", shape="MoE-A", method="triton", vs_dense=0.95, vs_grouped_mm=1.1)
    suite.add("mfu", precision="bf16 weights", mfu=0.41)
    status = {r["target"]: r["status"] for r in check_targets(suite)}
    assert status == {
        "MoE expert MLP fwd+bwd vs dense GEMMs (MoE-A)": "met",
        "MoE expert MLP fwd+bwd vs torch._grouped_mm (MoE-A)": "not met",
        "attention fwd+bwd vs SDPA flash (d 128, T 4096)": "not measured",
        "MoE LM training MFU": "met",
    }


def test_a_failing_case_is_recorded_and_the_budget_skips_the_rest():
    suite = Suite(torch.device("cpu"), torch.float32, dry=True)

    def section(s):
        s.case("perf", "broken", lambda: 1 / 0)
        s.case("perf", "fine", lambda: [{"ms": 1.0}])
        s.deadline = 0  # budget spent
        s.case("perf", "late", lambda: [{"ms": 2.0}])

    suite.section("perf", 10, section)
    got = {r["case"]: r for r in suite.rows["perf"]}
    assert got["broken"]["error"].startswith("ZeroDivisionError")
    assert got["fine"] == {"case": "fine", "ms": 1.0}
    assert "budget" in got["late"]["error"]
