"""Acceptance: SIGKILL at seeded random moments, resume, and get the uninterrupted run bit for bit.

Two kinds of moments, for single-file, sharded (DCP) and asynchronous sharded checkpoints:
- a hook (``faults.arm("<point>:<n>")``, as ``SPARSE_KILL_AT`` does; training/checkpoint/faults.py)
  kills the process at the n-th crossing of a named point inside a save: between a temp file's
  fsync and its rename, right after the rename, between ``latest`` and pruning, in the middle of
  pruning (also right after a sharded folder is renamed to its temp name for deletion), after a
  sharded folder's ``extra.pt``, before its ``manifest.json``;
- a timer kills it a random delay after it logged its first row (anywhere: steps, evals, saves).

Each training process is forked from the test process (which imported everything but never
trains), so a restart costs no interpreter start-up; it is still a separate process that dies by
SIGKILL with nothing flushed. Each chain restarts the same run folder (``trainer.resume=auto``)
after every kill until it
finishes. Checked at the end of each chain: every train and eval loss equals the uninterrupted
run's exactly, every row appears once (none missing), the exported weights are identical, and no
temp file or unfinished checkpoint is left.
"""

import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_config
from training.checkpoint import files as ckpt
from training.metrics import read_metrics
from training.trainer import train

ROOT = Path(__file__).resolve().parents[3]
MAX_STEPS, EVAL_EVERY = 12, 4
COMMON = [
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.checkpoint_every=2",
    f"trainer.eval_every={EVAL_EVERY}",
    "trainer.sample_tokens=0",
    "trainer.keep_last=2",
    "trainer.log_every=1",
]
FORMATS = {
    "pt": ["trainer.checkpoint_format=torch"],
    "dcp": ["trainer.checkpoint_format=dcp"],
    "dcp_async": ["trainer.checkpoint_format=dcp", "trainer.checkpoint_async=true"],
}
FILE_POINTS = ["atomic_write:before_rename", "atomic_write:after_rename", "prune:before", "prune:after_one"]
DCP_POINTS = ["dcp:after_extra", "dcp:before_manifest", "remove:renamed"]
HOOK_KILLS, TIMER_KILLS = 5, 2  # per checkpoint format: 21 kills in all


def _child(run: Path, overrides: list[str], kill_at: str | None) -> None:
    """A forked training process: imports are inherited, state is not (the parent never trains)."""
    from training.checkpoint import faults

    try:
        faults.arm(kill_at)
        train(tiny_config(run, *overrides))
    except BaseException:  # noqa: BLE001  (the parent reports whatever ended the child)
        import traceback

        (run.parent / f"{run.name}.error").write_text(traceback.format_exc())
        os._exit(1)
    os._exit(0)


def _start(run: Path, overrides: list[str], kill_at: str | None):
    import multiprocessing

    proc = multiprocessing.get_context("fork").Process(target=_child, args=(run, overrides, kill_at), daemon=False)
    proc.start()
    return proc


def _run_once(run: Path, overrides: list[str], moment: tuple) -> int:
    """One process on ``run``, killed at ``moment`` (("hook", point, n) | ("time", delay) | ("none",)); → exit code."""
    proc = _start(run, overrides, f"{moment[1]}:{moment[2]}" if moment[0] == "hook" else None)
    if moment[0] == "time":
        metrics, start_size = run / "metrics.jsonl", None
        deadline = time.monotonic() + 120
        while proc.is_alive() and time.monotonic() < deadline:  # wait until this process logs a row
            size = metrics.stat().st_size if metrics.exists() else -1
            if start_size is None:
                start_size = size
            elif size != start_size:
                break
            time.sleep(0.002)
        time.sleep(moment[1])
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=300)
    error = run.parent / f"{run.name}.error"
    assert proc.exitcode in (0, -signal.SIGKILL), f"moment {moment}: exit {proc.exitcode}\n" + (
        error.read_text()[-3000:] if error.exists() else ""
    )
    return proc.exitcode


def _rows(run: Path):
    rows = read_metrics(run)
    return (
        [(r["step"], r["loss"]) for r in rows if "loss" in r],
        [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r],
        [r["step"] for r in rows if any(k.startswith("acct/") for k in r)],
    )


def _check_chain(run: Path, reference: Path) -> None:
    losses, val_losses, acct = _rows(run)
    assert [s for s, _ in losses] == list(range(1, MAX_STEPS + 1)), "train rows missing or duplicated"
    assert [s for s, _ in val_losses] == list(range(0, MAX_STEPS + 1, EVAL_EVERY)), "eval rows missing or duplicated"
    assert acct == [0]
    assert _rows(run) == _rows(reference)  # equality of every loss, not closeness
    from safetensors.torch import load_file

    got, want = load_file(str(run / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    stray = [p for p in run.rglob("*") if ".tmp" in p.name]
    assert not stray, f"stray temp files: {stray}"
    for path in ckpt.list_checkpoints(run):  # every checkpoint left is complete and verifies
        ckpt.load_checkpoint(path)


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_bit_exact(tmp_path):
    rng = random.Random(20)
    kills, log = 0, []
    started = time.monotonic()
    for name, extra in FORMATS.items():
        overrides = [*COMMON, *extra]
        reference = tmp_path / f"{name}-straight"
        assert _run_once(reference, overrides, ("none",)) == 0  # forked too: the test process never trains
        points = FILE_POINTS + (DCP_POINTS if name != "pt" else [])
        chain, done, wanted = 0, False, {"hook": HOOK_KILLS, "time": TIMER_KILLS}
        run = tmp_path / f"{name}-0"
        while any(wanted.values()):
            if done:  # the chain reached max_steps: check it, start another one
                _check_chain(run, reference)
                chain += 1
                run, done = tmp_path / f"{name}-{chain}", False
            kind = rng.choice([k for k, left in wanted.items() if left])
            if kind == "hook":
                moment = ("hook", rng.choice(points), rng.randint(1, 3))
            else:
                moment = ("time", round(rng.uniform(0.0, 0.5), 3))
            rc = _run_once(run, overrides, moment)
            log.append((name, chain, moment, rc))
            if rc == -signal.SIGKILL:
                kills += 1
                wanted[kind] -= 1
            else:
                done = True
        if not done:
            assert _run_once(run, overrides, ("none",)) == 0
        _check_chain(run, reference)
    hook_kills = sum(1 for _, _, m, rc in log if rc == -signal.SIGKILL and m[0] == "hook")
    print(
        f"\n{kills} SIGKILLs ({hook_kills} inside saves by hook, {kills - hook_kills} by timer) "
        f"in {time.monotonic() - started:.0f} s; all resumes bit-exact"
    )
    assert kills == 3 * (HOOK_KILLS + TIMER_KILLS) and hook_kills == 3 * HOOK_KILLS, log
