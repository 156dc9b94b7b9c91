"""recipes.reproduce: paired verdict rule, power calculation, both tiers' plans, a report on synthetic runs."""

import json
import math
import re

import pytest

from recipes.reproduce import plan as reproduce
from recipes.reproduce import power, suite
from recipes.reproduce.methods import METHOD_NAMES, METHODS, VARIANTS, Check
from recipes.reproduce.metrics import verdict
from recipes.reproduce.report import write_suite_report


def test_paired_verdict_uses_the_per_seed_differences_and_a_one_sided_t():
    baseline = [3.00, 3.10, 2.90]  # large seed-to-seed spread ...
    method = [2.97, 3.08, 2.86]  # ... that the pairing cancels: d = −0.03, −0.02, −0.04
    result = verdict(baseline, method, "lower")
    assert result["delta"] == pytest.approx(-0.03) and result["sigma_d"] == pytest.approx(0.01)
    assert result["noise"] == pytest.approx(2.920 * 0.01 / math.sqrt(3))  # t₀.₉₅(2)·σ_d/√n
    assert result["verdict"] == "held"
    assert verdict(method, baseline, "lower")["verdict"] == "not held"
    # unpaired (Welch) the same numbers cannot decide: the spread of the arms swamps Δ
    assert verdict(baseline, method, "lower", paired=False)["verdict"].startswith("inconclusive")
    assert verdict(baseline, [3.03, 3.12, 2.94], "higher")["verdict"] == "held"  # e.g. routing agreement
    assert verdict([3.0, 3.1, 3.2], [3.0, 3.05, 3.25], "lower")["verdict"].startswith("inconclusive")


def test_no_worse_margin_and_missing_seeds():
    baseline = [3.00, 3.02, 3.04]
    assert verdict(baseline, [3.005, 3.026, 3.044], "no_worse:0.02")["verdict"] == "held"
    assert verdict(baseline, [3.30, 3.32, 3.35], "no_worse:0.1")["verdict"] == "not held"
    assert verdict([3.0], [2.0], "lower")["verdict"].startswith("inconclusive")
    one_pair = verdict([3.0, None, 3.1], [2.0, 2.1, None], "lower")  # only seed 0 has both arms
    assert one_pair["delta"] is None and one_pair["verdict"].startswith("inconclusive")


def test_power_calculation_by_hand():
    # n = 3: t₀.₉₅(2) + t₀.₈₀(2) = 2.920 + 1.061 = 3.981
    assert power.detectable_effect(0.06, 3) == pytest.approx(3.981 * 0.06 / math.sqrt(3))
    # σ_d(100) = 0.06, δ = 0.05: 100·(3.981·0.06/(0.05·√3))² = 760.6 steps under σ ∝ 1/√steps
    assert power.required_steps(0.06, 0.05, 3) == pytest.approx(100 * (3.981 * 0.06 / (0.05 * math.sqrt(3))) ** 2)
    assert power.required_seeds(0.01, 0.05) == 3 and power.required_seeds(1.0, 0.01) is None
    assert power.t_quantile(0.95, 30) == pytest.approx(1.697, abs=0.005)  # Cornish–Fisher beyond the table
    row = power.check_power(Check("q", "a:final", "b:final", effect=0.05, sigma_100=0.06), seeds=3, steps=400)
    assert row["sigma_at_steps"] == pytest.approx(0.03) and row["steps_required"] == pytest.approx(760.6, rel=1e-3)
    with pytest.raises(ValueError, match="effect"):
        power.required_steps(0.06, 0.0, 3)


def test_small_plan_covers_every_method_and_trains_shared_baselines_once(tmp_path):
    jobs = reproduce.plan(METHODS, seeds=3, steps=40, runs=tmp_path / "runs")
    names = [j.name for j in jobs]
    assert len(names) == len(set(names))
    assert sum(n.startswith("baselines/dense/") for n in names) == 3  # used by moe_vs_dense, mohd, itt, recurrent
    assert (
        sum(n.startswith("baselines/moe/seed") and n.count("/") == 2 for n in names) == 3
    )  # moe: emoe, moue, mhmoe, xmoe, moec
    for method in METHODS:
        for variant in method.variants:
            assert any(n.startswith(VARIANTS[variant].folder + "/seed") for n in names), variant
        for check in method.checks:
            assert check.baseline.split(":")[0] in (*method.variants, "dha", "gqa", "plain_merge", "harc_merge")
    for new in ("mhmoe", "xmoe", "moec", "parallel_sampler"):  # issue 21 item 7
        assert new in METHOD_NAMES
    assert {"routing/mhmoe/seed2", "routing/xmoe/seed0", "routing/moec/seed1", "looped/recurrent/seed0/sampler"} <= set(
        names
    )
    sampler = next(j for j in jobs if j.name == "looped/recurrent/seed0/sampler")
    assert sampler.after == ("looped/recurrent/seed0",) and "recipes.reproduce.sampler" in sampler.command
    train = next(j for j in jobs if j.name == "sgt/sgt/seed1")
    assert {"trainer.max_steps=40", "trainer.threads=1", "seed=1", "model.depth.first_selection_step=5"} <= set(
        train.command
    )
    assert all(dep in names for j in jobs for dep in j.after)
    assert all(not j.done() for j in jobs)
    assert 0 < reproduce.estimate_wall(jobs, 2) < sum(j.estimate_s for j in jobs)
    small = reproduce.plan(METHODS, 3, reproduce.DEFAULT_STEPS, tmp_path / "runs")
    assert reproduce.estimate_wall(small, 2) <= reproduce.SMALL_BUDGET_S  # make reproduce: ≤ 45 min


def test_full_tier_has_the_core_claims_at_powered_steps_within_two_hours(tmp_path):
    methods = reproduce.full_tier_methods()
    assert [m.name for m in methods] == ["moe_vs_dense", "emoe", "ernie_elastic", "dha_vs_gqa", "itt", "sgt"]
    sgt = next(m for m in methods if m.name == "sgt")
    assert [c.question for c in sgt.checks] == ["high- vs low-entropy heads"] and sgt.variants == (
        "sgt",
        "sgt_low_entropy",
    )
    seeds, steps = reproduce.choose_full_tier()
    assert 3 <= seeds <= 8 and all(reproduce.FULL_MIN_STEPS <= s <= reproduce.FULL_MAX_STEPS for s in steps.values())
    assert max(steps.values()) > 100  # the power calculation asks for more than the small tier
    jobs = reproduce.plan(methods, seeds, 100, tmp_path / "runs", steps)
    assert reproduce.estimate_wall(jobs, 2) <= reproduce.FULL_BUDGET_S  # make reproduce SCALE=full: ≤ 2 h
    powered = reproduce.powered_checks(methods, seeds, steps)
    assert len(powered) > len(reproduce.powered_checks(methods, 3, reproduce.full_tier_steps(3)))  # seeds beat steps
    # every check it counts as powered really gets the steps its power requirement asks for
    for method in methods:
        for check in method.checks:
            if f"{method.name}: {check.question}" in powered:
                assert power.required_steps(check.sigma_100, check.effect, seeds) <= steps[method.name]
    dense = [j for j in jobs if "baselines/dense/seed0" in j.name]
    assert len(dense) == len({steps["moe_vs_dense"], steps["itt"]})  # shared only where the step counts agree
    dha = next(j for j in jobs if j.name.endswith("dha_vs_gqa/seed0"))
    assert (
        f"trainer.max_steps={steps['dha_vs_gqa']}" in dha.command
        and f"fusion_steps={steps['dha_vs_gqa']}" in dha.command
    )


def test_arms_of_every_check_share_data_order(tmp_path):
    """Same seed → same data order needs the same data, batch size and sequence length in both arms' configs."""
    from training.cli import compose

    def data_key(variant):
        cfg = compose([*VARIANTS[variant].overrides, f"run_dir={tmp_path}"])
        return (json.dumps(dict(cfg["data"]), sort_keys=True, default=str), cfg["trainer"]["batch_size"], cfg["seed"])

    keys = {}
    for method in METHODS:
        variants = [v for v in method.variants]
        for v in variants:
            keys.setdefault(v, data_key(v))
        assert len({keys[v] for v in variants}) <= 1, method.name


def _run(folder, seed, losses, flops_per_token=1e6, steps=(0, 10, 20)):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(
        f"seed: {seed}\ntrainer:\n  max_steps: {steps[-1]}\n  batch_size: 2\ndata:\n  seq_len: 8\n"
    )
    rows = [{"step": s, "loss": 5.0, "flops_per_token": flops_per_token} for s in steps[1:]]
    rows += [{"step": s, "val_loss": loss} for s, loss in zip(steps, losses)]
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_report_states_budgets_and_the_power_calculation(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    method = next(m for m in METHODS if m.name == "moe_vs_dense")
    for seed, (d, m) in enumerate([(5.0, 4.9), (5.2, 5.15), (5.1, 4.95)]):  # d = −0.1, −0.05, −0.15
        _run(runs / "baselines" / "dense" / f"seed{seed}", seed, [6.0, 5.5, d])
        _run(runs / "baselines" / "moe" / f"seed{seed}", seed, [6.0, 5.4, m], flops_per_token=2e6)
    text = write_suite_report([method], 3, 20, [], runs, results).read_text()
    assert "1 held, 0 not held, 0 inconclusive of 1 checks" in text
    # each arm's budget: 20 steps × 16 tokens, FLOPs = flops_per_token × tokens
    assert "20 steps, 0.00M tok, 3.20e+08 FLOPs" in text and "20 steps, 0.00M tok, 6.40e+08 FLOPs" in text
    assert "## Power calculation" in text and "σ_d ∝ 1/√steps" in text
    power_line = next(line for line in text.splitlines() if line.startswith("| moe_vs_dense | final val loss"))
    cells = [c.strip() for c in power_line.strip("|").split("|")]
    assert cells[2] == "0.05" and cells[3] == "0.0564" and cells[5] == "3"
    assert float(cells[4]) == pytest.approx(0.05, abs=1e-4)  # σ of the per-seed differences
    # re-measured σ_d at 20 steps, scaled to 100 steps by the assumption: 100·(3.981·0.05·√0.2/(0.05·√3))² ≈ 106
    assert cells[7] == f"{power.required_steps(0.05 * math.sqrt(20 / 100), 0.05, 3):.0f}" == "106"


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    assert (
        suite.main(
            [
                "--dry-run",
                "--methods",
                "emoe,sgt",
                "--seeds",
                "2",
                "--steps",
                "16",
                "--runs-dir",
                str(tmp_path / "runs"),
                "--results-dir",
                str(tmp_path / "results"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "min on an idle 2-core CPU" in out and "emoe/emoe/seed1" in out and "baselines/moe/seed0/eval" in out
    assert suite.main(["--dry-run", "--scale", "full", "--runs-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("full tier:") and "steps" in out and "dha_vs_gqa/seed2" in out
    assert not (tmp_path / "runs").exists()


def test_full_tier_methods_subset_runs_part_of_the_whole_tiers_plan(tmp_path, capsys):
    """--methods on the full tier keeps the whole tier's seeds and steps (so a subset resumes the same runs)."""

    def header(*extra):
        assert suite.main(["--dry-run", "--scale", "full", "--runs-dir", str(tmp_path / "runs"), *extra]) == 0
        return capsys.readouterr().out.splitlines()[0]

    whole, subset = header(), header("--methods", "itt,sgt")
    for name in ("itt", "sgt", "seeds"):
        pattern = rf"\b{name} (\d+)" if name != "seeds" else r"(\d+) seeds"
        assert re.search(pattern, subset).group(1) == re.search(pattern, whole).group(1), (name, whole, subset)
    assert "moe_vs_dense" in whole and "moe_vs_dense" not in subset


@pytest.mark.parametrize(
    "baseline,method",
    [("dense", "moe"), ("moe", "mhmoe"), ("moe", "xmoe"), ("moe", "moec")],
)
def test_equal_flop_comparisons_are_flop_matched(tmp_path, baseline, method):
    """Checks that claim equal FLOPs per step: train FLOPs per token (training.accounting) within 1%.

    (Not ERNIE: its elastic arm's full_plus_sub steps add a sub-model pass, stated in its claim.)"""
    from training.accounting.account import account
    from training.build import build_model
    from training.cli import compose
    from training.config import validate

    def flops(variant):
        root = validate(compose([*VARIANTS[variant].overrides, f"run_dir={tmp_path}", "data.tokenizer.kind=bytes"]))
        return account(build_model(root, 256), root.data.seq_len, training=True).train_flops_per_token

    assert flops(method) == pytest.approx(flops(baseline), rel=0.01)


def test_merge_arms_report_the_budget_of_their_merge_report(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    method = next(m for m in METHODS if m.name == "harc_merge")
    for seed in range(2):
        folder = runs / "harc_merge" / f"seed{seed}" / "ties"
        folder.mkdir(parents=True)
        arm = {"steps": 30, "tokens": 3_000_000, "train_flops": 6e12, "calibration_tokens": 0, "calibration_flops": 0}
        report = {
            "losses": {"plain_merge": [3.6, 3.5 + seed * 0.01], "harc_merge": [3.5, 3.4]},
            "routing_agreement": {"plain_merge": [[0.5]], "harc_merge": [[0.6]]},
            "budget": {
                "plain_merge": arm,
                "harc_merge": {**arm, "calibration_tokens": 1000, "calibration_flops": 1e12, "total_flops": 7e12},
            },
        }
        (folder / "merge_report.json").write_text(json.dumps(report))
    text = write_suite_report([method], 2, 20, [], runs, results).read_text()
    # plain merge: the base and fine-tunes' training; HARC: the same plus its calibration forward passes
    assert "30 steps, 3.00M tok, 6.00e+12 FLOPs" in text and "30 steps, 3.00M tok, 7.00e+12 FLOPs" in text


def test_sweep_metrics_read_the_csv_evaluate_py_writes(tmp_path):
    """topk / topk_drop / depth arms read the sweep CSV through its real columns (training.eval.sweep_table)."""
    from recipes.reproduce.metrics import metric, run_folder
    from training.eval.sweep_table import write_csv

    def row(dimension, setting, loss, trained=False):
        return {
            "dimension": dimension,
            "setting": setting,
            "trained": trained,
            "active_params": 1,
            "forward_flops_per_token": 1.0,
            "val_loss": loss,
            "delta_val_loss": None,
            "val_bpb": 1.0,
        }

    eval_dir = run_folder(tmp_path, "moe", 0) / "eval"
    eval_dir.mkdir(parents=True)
    write_csv([row("top_k", 1, 5.5), row("top_k", 2, 5.0, True), row("top_k", 4, 4.9)], eval_dir / "elastic.csv")
    write_csv([row("iterations", 4, 4.7, True), row("iterations", 8, 4.65)], eval_dir / "depth.csv")
    assert metric(tmp_path, "moe:topk:1", 0) == pytest.approx(5.5)
    assert metric(tmp_path, "moe:topk_drop:2:4", 0) == pytest.approx(-0.1)
    assert metric(tmp_path, "moe:depth:8", 0) == pytest.approx(4.65)
