"""Benchmark plumbing: ratios per interleaved pair, output folders, --check."""

import csv

import pytest

from benchmarks import step_time
from benchmarks.common import LOCAL_RESULTS, RESULTS, paired_ratios, target_line


def test_ratios_are_taken_per_pair_not_as_a_ratio_of_medians():
    # the machine slowed down half-way: both arms of each pair see the same load
    framework = [100.0, 98.0, 52.0, 50.0, 49.0]
    hand = [110.0, 105.0, 55.0, 53.0, 52.0]
    summary = paired_ratios(framework, hand)
    assert summary["median"] == pytest.approx(49.0 / 52.0)  # median of the per-pair ratios
    assert summary["min"] == pytest.approx(100.0 / 110.0) and summary["max"] == pytest.approx(52.0 / 55.0)
    assert summary["pairs"] == 5
    line, met = target_line("ratio", summary, 0.9)
    assert met and "over 5 pairs" in line and "met" in line
    assert not target_line("ratio", summary, 0.99)[1]
    with pytest.raises(ValueError, match="equally many"):
        paired_ratios([1.0], [1.0, 2.0])


def test_the_default_output_folder_is_not_the_tracked_one():
    assert LOCAL_RESULTS.parent == RESULTS
    gitignore = (RESULTS.parents[1] / ".gitignore").read_text()
    assert "benchmarks/results/local/" in gitignore


@pytest.mark.slow
def test_step_time_writes_into_out_and_check_fails_an_unreachable_target(tmp_path, monkeypatch, one_thread):
    summary = step_time.main(["--steps", "1", "--repeats", "2", "--out", str(tmp_path)])
    row = next(csv.DictReader(open(tmp_path / "step_time_tiny.csv")))
    assert float(row["ratio_median"]) == pytest.approx(summary["median"], rel=1e-3) and row["pairs"] == "2"
    assert (tmp_path / "step_time_tiny.png").stat().st_size > 0
    monkeypatch.setattr(step_time, "TARGET", 1e9)
    with pytest.raises(SystemExit) as exit_info:
        step_time.main(["--steps", "1", "--repeats", "2", "--out", str(tmp_path), "--check"])
    assert exit_info.value.code == 1
