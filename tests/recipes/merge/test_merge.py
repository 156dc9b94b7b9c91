"""Checkpoint merging (task arithmetic, TIES) and the merge + HARC command end to end."""

import json

import pytest
import torch

from recipes.merge.merge import main, merge_state_dicts, ties_delta
from tests.helpers import tiny_config
from training.checkpoint import files as ckpt
from training.eval.loss import load_trained
from training.trainer import train


def test_ties_trims_elects_signs_and_averages_the_agreeing_entries():
    tau_a = torch.tensor([3.0, -1.0, 0.5, 2.0])
    tau_b = torch.tensor([-2.0, -4.0, 0.1, 1.0])
    # density 0.5 keeps [3, 0, 0, 2] and [-2, -4, 0, 0]; elected signs of the sum [1, -4, 0, 2]: + - 0 +
    assert ties_delta([tau_a, tau_b], 0.5).tolist() == [3.0, -4.0, 0.0, 2.0]
    # density 1: nothing trimmed; entry 3 averages the two agreeing values
    assert ties_delta([tau_a, tau_b], 1.0).tolist() == pytest.approx([3.0, -2.5, 0.3, 1.5])


def test_merges_apply_to_task_vectors_and_copy_integer_entries():
    base = {"w": torch.tensor([1.0, 1.0, 1.0]), "count": torch.tensor([5])}
    a = {"w": torch.tensor([2.0, 1.0, 0.0]), "count": torch.tensor([7])}
    b = {"w": torch.tensor([4.0, 1.0, 3.0]), "count": torch.tensor([9])}
    averaged = merge_state_dicts(base, [a, b], "task_arithmetic")  # λ = 1/2: the average of the fine-tunes
    assert averaged["w"].tolist() == [3.0, 1.0, 1.5] and averaged["count"].tolist() == [5]
    assert merge_state_dicts(base, [a, b], "task_arithmetic", scale=1.0)["w"].tolist() == [5.0, 1.0, 2.0]
    # TIES, density 1: entry 2 has τ = (-1, 2) → sign + → only τ_b = 2 counts
    assert merge_state_dicts(base, [a, b], "ties", density=1.0)["w"].tolist() == [3.0, 1.0, 3.0]
    with pytest.raises(ValueError, match="different tensors from the base"):
        merge_state_dicts(base, [{"w": torch.zeros(3)}], "ties")
    with pytest.raises(ValueError, match="method='dare'"):
        merge_state_dicts(base, [a], "dare")


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """A tiny MoE base (10 steps) and two fine-tunes of it (to step 20) with different learning rates."""
    root = tmp_path_factory.mktemp("merge")
    common = [
        "model/ffn=moe",
        "model.n_layers=2",
        "trainer.sample_tokens=0",
        "trainer.eval_every=10",
        "trainer.checkpoint_every=10",
    ]
    train(tiny_config(root / "base", *common, "trainer.max_steps=10"))
    base_ckpt = root / "base" / "checkpoints" / "step_00000010.pt"
    for name, lr in (("a", "1e-2"), ("b", "3e-3")):
        train(tiny_config(root / name, *common, f"trainer.resume={base_ckpt}", f"optim.lr={lr}"))
    return root


def test_merge_command_reports_losses_and_routing_agreement_before_and_after_harc(fine_tuned, capsys):
    root, out = fine_tuned, fine_tuned / "merged"
    main(
        [
            f"base={root / 'base'}",
            f"sources={root / 'a'},{root / 'b'}",
            f"out={out}",
            "method=ties",
            "density=0.5",
            "calib_batches=2",
            "batch_size=4",
            "eval_batches=2",
            "harc.damping=1.05",
            "harc.preconditioner=diagonal",
        ]
    )
    report = json.loads((out / "merge_report.json").read_text())
    assert set(report["losses"]) == {"base", "source0", "source1", "plain_merge", "harc_merge"}
    assert all(len(v) == 2 and all(0 < x < 10 for x in v) for v in report["losses"].values())
    for name in ("plain_merge", "harc_merge"):
        per_task = report["routing_agreement"][name]
        assert len(per_task) == 2 and all(len(layers) == 2 and all(0 <= a <= 1 for a in layers) for layers in per_task)
    assert [s["layer"] for s in report["harc_solver"]] == [0, 1] and all(
        s["relative_residual"] < 1e-4 for s in report["harc_solver"]
    )
    printed = capsys.readouterr().out
    assert "routing agreement" in printed and "budget: training steps" in printed
    # budgets: base 10 steps, each fine-tune 10 more; the merges stand on all three; HARC adds forward passes only
    budget = report["budget"]
    tokens_per_step = budget["base"]["tokens"] // 10
    assert [budget[k]["steps"] for k in ("base", "source0", "source1", "plain_merge", "harc_merge")] == [
        10,
        20,
        20,
        30,
        30,
    ]
    assert budget["plain_merge"]["tokens"] == 30 * tokens_per_step
    base_flops = budget["base"]["train_flops"]
    fine_tune_flops = sum(budget[f"source{i}"]["train_flops"] - base_flops for i in (0, 1))
    assert budget["plain_merge"]["train_flops"] == pytest.approx(base_flops + fine_tune_flops)
    assert budget["plain_merge"]["calibration_tokens"] == 0
    harc_budget = budget["harc_merge"]
    seq_len = tokens_per_step // 4  # tiny_config: batch size 4, no grad accumulation
    assert harc_budget["calibration_tokens"] == 2 * 2 * 4 * seq_len  # tasks × calib_batches × batch_size × T
    # one whole forward per calibrated layer (2); the logged train FLOPs/token are 3 × forward
    forward_per_token = base_flops / (3 * budget["base"]["tokens"])
    assert harc_budget["calibration_flops"] == pytest.approx(2 * harc_budget["calibration_tokens"] * forward_per_token)
    assert harc_budget["total_flops"] == pytest.approx(harc_budget["train_flops"] + harc_budget["calibration_flops"])
    # the calibrated model is a loadable run folder whose routers (only) differ from the plain merge
    harc_model, *_ = load_trained(out / "harc", "cpu")
    plain = ckpt.find_resume_checkpoint(out / "plain")[1]["model"]
    changed = {k for k, v in harc_model.state_dict().items() if not torch.equal(v, plain[k])}
    assert changed == {"depth.blocks.0.ffn.router.proj.weight", "depth.blocks.1.ffn.router.proj.weight"}


def test_merge_command_rejects_unknown_options(fine_tuned, capsys):
    root = fine_tuned
    with pytest.raises(SystemExit) as exit_info:
        main([f"base={root / 'base'}", f"sources={root / 'a'}", f"out={root / 'x'}", "harc.precond=diagonal"])
    assert exit_info.value.code == 2 and "harc.precond" in capsys.readouterr().err
