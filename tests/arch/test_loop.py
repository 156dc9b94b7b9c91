"""Looped depth: execute-order repetition and the Huginn recurrent core (sampler, truncated backprop,
any iteration count at evaluation), plus every looped-depth preset training end to end."""

import math
from pathlib import Path

import pytest
import torch

from arch.registry import ConfigError
from tests.arch.depth_helpers import model
from tests.helpers import tiny_config
from training.accounting.account import account
from training.trainer import train

IDX = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))


def test_loop_runs_its_execute_order_with_shared_weights():
    loop = model({"name": "loop", "looped_layers": [1, 3], "repeats": 3})
    assert loop.depth.order == [0, 1, 1, 1, 2, 3, 3, 3]
    explicit = model({"name": "loop", "order": [0, 1, 1, 1, 2, 3, 3, 3]})
    explicit.load_state_dict(loop.state_dict())
    assert torch.equal(loop(IDX, IDX).logits, explicit(IDX, IDX).logits)
    assert model({"name": "loop", "pattern": "stack", "repeats": 2}).depth.order == [0, 1, 2, 3, 0, 1, 2, 3]
    plain = model({"name": "plain"})
    assert loop.num_parameters() == plain.num_parameters()
    block = (
        account(plain, 12).forward_flops_per_token
        - account(model({"name": "plain"}, n_layers=3), 12).forward_flops_per_token
    )
    assert account(loop, 12).forward_flops_per_token - account(plain, 12).forward_flops_per_token == pytest.approx(
        4 * block
    )
    loop.depth.set_repeats(1)  # evaluation at another count; repeats=1 is the plain stack
    loop.load_state_dict(plain.state_dict())
    assert torch.equal(loop(IDX, IDX).logits, plain(IDX, IDX).logits)


def test_loop_generation_with_kv_cache_matches_full_recompute():
    loop = model({"name": "loop", "repeats": 2}).eval()
    generated = loop.generate(IDX[:, :4], 6, temperature=0)
    seq = IDX[:, :4]
    for _ in range(6):
        seq = torch.cat([seq, loop(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, seq)


def test_iteration_sampler_follows_the_lognormal_poisson_rule():
    rec = model({"name": "recurrent", "mean_recurrence": 6, "mean_backprop_depth": 2}).train()
    draws = []
    for step in range(3000):
        rec.depth.after_optimizer_step(step)
        draws.append(rec.depth.sample_iterations())
    total = [n + k for n, k in draws]
    # r = Poisson(τ) + 1 with E[τ] = r̄ (the −σ²/2 shift): mean r̄ + 1; backprop through min(k̄, r).
    assert sum(total) / len(total) == pytest.approx(7.0, abs=0.3)
    assert all(k == min(2, n + k) and n == max(n + k - 2, 0) for n, k in draws)
    assert min(total) == 1 and max(total) > 14  # heavy right tail
    # Seeded by the optimizer step: a resumed run (buffer restored from the checkpoint) draws the same r.
    rec.depth.after_optimizer_step(41)
    first = rec.depth.sample_iterations()
    again = model({"name": "recurrent", "mean_recurrence": 6, "mean_backprop_depth": 2}).train()
    again.load_state_dict(rec.state_dict())
    assert again.depth.sample_iterations() == first
    rec.eval()
    assert rec.depth.sample_iterations() == (0, 6)


def _saved_tensors(rec, n_frozen: int, n_grad: int) -> tuple[int, torch.Tensor]:
    rec.depth.sample_iterations = lambda: (n_frozen, n_grad)
    count = [0]

    def pack(t):
        count[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = rec(IDX, IDX)
    return count[0], out.loss


def test_truncated_backprop_keeps_no_graph_for_the_early_iterations():
    rec = model({"name": "recurrent"}).train()
    short, _ = _saved_tensors(rec, 0, 2)
    long, loss = _saved_tensors(rec, 7, 2)
    assert long == short  # 7 extra iterations under no_grad saved nothing for backward
    more, _ = _saved_tensors(rec, 0, 3)
    assert more > short  # …while an extra iteration with gradient does
    loss.backward()
    assert rec.depth.adapter.weight.grad.abs().sum() > 0 and rec.depth.blocks[0].attn.wq.weight.grad.abs().sum() > 0


def test_recurrent_core_evaluates_at_any_iteration_count():
    rec = model({"name": "recurrent", "state_init": "zero"}).eval()
    base = account(rec, 12).forward_flops_per_token
    losses, flops = [], []
    for r in (1, 2, 4, 9):
        rec.depth.set_iterations(r)
        losses.append(rec(IDX, IDX).loss)
        flops.append(account(rec, 12).forward_flops_per_token)
    assert all(torch.isfinite(l) for l in losses) and len({round(l.item(), 6) for l in losses}) == 4
    assert flops[3] - flops[2] == pytest.approx(5 * (flops[1] - flops[0]))  # linear in r
    assert flops[2] == base  # eval default r = r̄ = 4
    generated = rec.generate(IDX[:, :4], 5, temperature=0)  # fixed r: one cache slot per attention call
    seq = IDX[:, :4]
    for _ in range(5):
        seq = torch.cat([seq, rec(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, seq)


def test_recurrent_bad_options_fail_clearly():
    with pytest.raises(
        ConfigError, match=r"prelude_layers \+ core_layers \+ coda_layers = 2\+2\+1 must equal model.n_layers=4"
    ):
        model({"name": "recurrent", "prelude_layers": 2})
    with pytest.raises(ConfigError, match=r"model.depth.looped_layers=\[5\] holds \[5\]"):
        model({"name": "loop", "looped_layers": [5]})
    rec = model({"name": "recurrent", "injection": "add", "state_norm": False})
    assert rec.depth.adapter is None and torch.isfinite(rec(IDX, IDX).loss)


@pytest.mark.parametrize("experiment", ["looped_baseline", "loop_x4", "itt_x4", "recurrent"])
def test_every_looped_preset_trains_and_its_sweep_runs(tmp_path: Path, experiment):
    from omegaconf import OmegaConf

    from training.eval.elastic_sweeps import run_evaluation

    run_dir = tmp_path / experiment
    cfg = tiny_config(
        run_dir,
        f"experiment={experiment}",
        "model.n_layers=4",
        "trainer.max_steps=16",
        "trainer.eval_every=16",
        "trainer.checkpoint_every=16",
        "optim.lr=3e-3",
    )
    summary = train(cfg)
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 0.3
    eval_cfg = OmegaConf.create(
        {
            "ckpt": str(run_dir),
            "out_dir": str(tmp_path / "eval"),
            "analysis": "depth",
            "device": "cpu",
            "batch_size": 4,
            "eval_batches": 2,
            "seed": 0,
            "sweep": {"iterations": [1, 2], "itt_ratios": [[0, 0, 0], [0.7, 0.7, 0.7]]},
        }
    )
    outputs = run_evaluation(eval_cfg)
    if experiment == "looped_baseline":
        assert outputs == {}
        return
    import csv

    rows = list(csv.DictReader(open(tmp_path / "eval" / "depth.csv")))
    assert (tmp_path / "eval" / "depth.png").stat().st_size > 0
    # the two swept settings, plus the trained one (starred) when it is not among them
    assert len(rows) in (2, 3) and sum(r["trained"] == "True" for r in rows) == 1
    flops = [float(r["forward_flops_per_token"]) for r in rows]
    assert max(flops) > min(flops) and all(math.isfinite(float(r["val_loss"])) for r in rows)


@pytest.mark.parametrize("d_model", [32, 64, 256])
def test_recurrent_initial_state_has_the_official_scale_for_any_width(d_model):
    """Huginn's initialize_state: sqrt(D) · TruncNormal(0, 2/(5D)) on ±3σ, so std ≈ sqrt(2/5)·0.986 whatever D."""
    from arch.depth.loop import RecurrentDepth
    from arch.layers import ModelShared

    depth = RecurrentDepth(4, lambda i: torch.nn.Identity(), ModelShared(d_model=d_model, n_layers=4, n_heads=2))
    torch.manual_seed(0)
    s = depth.initial_state(torch.empty(64, 64, d_model))
    truncated_std = math.sqrt(2 / 5) * 0.98654  # std of a N(0,1) truncated at ±3σ is 0.98654σ
    assert s.std().item() == pytest.approx(truncated_std, rel=0.02)
    assert s.abs().max().item() <= 3 * math.sqrt(2 / (5 * d_model)) * math.sqrt(d_model) + 1e-6
    for init, expected in (("normal", 1.0), ("embed", 1 / math.sqrt(d_model))):
        other = RecurrentDepth(
            4, lambda i: torch.nn.Identity(), ModelShared(d_model=d_model, n_layers=4, n_heads=2), state_init=init
        )
        assert other.initial_state(torch.empty(64, 64, d_model)).std().item() == pytest.approx(expected, rel=0.02)
    zero = RecurrentDepth(
        4, lambda i: torch.nn.Identity(), ModelShared(d_model=d_model, n_layers=4, n_heads=2), state_init="zero"
    )
    assert zero.initial_state(torch.empty(2, 3, d_model)).abs().sum() == 0
