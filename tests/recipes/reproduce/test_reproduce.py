"""recipes.reproduce.suite: the verdict rule, and a plan that covers every method with shared baselines trained once."""
import pytest

from recipes.reproduce import suite as reproduce
from recipes.reproduce.report import verdict


def test_verdict_rule_compares_the_difference_with_twice_the_pooled_std():
    baseline, noisy = [3.00, 3.02, 3.04], [2.90, 2.92, 2.94]  # std 0.02 each: 2σ = 0.04, Δ = −0.10
    result = verdict(baseline, noisy, "lower", paired=False)
    assert result["delta"] == pytest.approx(-0.10) and result["noise"] == pytest.approx(0.02)
    assert result["verdict"] == "held"
    assert verdict(noisy, baseline, "lower", paired=False)["verdict"] == "not held"
    assert verdict(baseline, [2.98, 3.00, 3.02], "lower", paired=False)["verdict"].startswith("inconclusive")
    assert verdict(baseline, [3.10, 3.12, 3.14], "higher", paired=False)["verdict"] == "held"  # e.g. routing agreement


def test_no_worse_claims_use_the_margin_and_paired_arms_the_per_seed_differences():
    baseline = [3.00, 3.02, 3.04]
    assert verdict(baseline, [3.005, 3.025, 3.045], "no_worse:0.1", paired=False)["verdict"] == "held"
    assert verdict(baseline, [3.30, 3.32, 3.34], "no_worse:0.1", paired=False)["verdict"] == "not held"
    # the same runs at two settings: seed-to-seed spread cancels, only the spread of the differences counts
    paired = verdict(baseline, [2.99, 3.01, 3.03], "lower", paired=True)
    assert paired["noise"] == pytest.approx(0.0, abs=1e-12) and paired["verdict"] == "held"
    assert verdict([3.0], [2.0], "lower", paired=False)["verdict"].startswith("inconclusive")
    assert verdict([3.0, None, 3.1], [2.0, 2.1, None], "lower", paired=True)["delta"] == pytest.approx(-1.0)


def test_plan_covers_every_method_and_trains_shared_baselines_once(tmp_path):
    jobs = reproduce.plan(reproduce.METHODS, seeds=3, steps=40, runs=tmp_path / "runs")
    names = [j.name for j in jobs]
    assert len(names) == len(set(names))
    assert sum(n.startswith("baselines/dense/") for n in names) == 3  # used by moe_vs_dense, mohd, itt, recurrent
    for method in reproduce.METHODS:
        for variant in method.variants:
            assert any(n.startswith(reproduce.VARIANTS[variant].folder + "/seed") for n in names), variant
        for check in method.checks:
            assert check.baseline.split(":")[0] in (*method.variants, "dha", "gqa", "plain_merge", "harc_merge")
    train = next(j for j in jobs if j.name == "sgt/sgt/seed1")
    assert {"trainer.max_steps=40", "trainer.threads=1", "seed=1", "model.depth.first_selection_step=5"} <= set(train.command)
    assert all(dep in names for j in jobs for dep in j.after)
    assert all(not j.done() for j in jobs)
    assert 0 < reproduce.estimate_wall(jobs, 2) < sum(j.estimate_s for j in jobs)


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    assert reproduce.main(["--dry-run", "--methods", "emoe,sgt", "--seeds", "2", "--steps", "16",
                           "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "min on an idle 2-core CPU" in out and "emoe/emoe/seed1" in out and "baselines/moe/seed0/eval" in out
    assert not (tmp_path / "runs").exists()
