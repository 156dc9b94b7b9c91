"""MoUE end to end: training with falling loss, exact resume of the widening state, presets, and
MoE → MoUE conversion (identical outputs before widening, moved optimizer moments, continued training)."""

from pathlib import Path

import pytest
import torch

from arch.ffn.universal import POOL_NAME
from recipes.moue.convert import convert, main
from tests.helpers import tiny_config
from training.checkpoint import files as ckpt
from training.config import ConfigError, validate
from training.eval.loss import load_trained
from training.metrics import read_metrics
from training.trainer import train

MOUE = ["model/ffn=moue", "model.ffn.n_universal=8", "model.ffn.window_size=6", "model.ffn.trajectory_dim=8"]
OPTIONS = {
    "default": [],
    "per_layer_shared_router_locals": [
        "model.ffn.balance_loss=per_layer",
        "model.ffn.router_sharing=shared",
        "model.ffn.n_local=1",
    ],
    "full_no_trajectory_uncorrected": [
        "model.ffn.topology=full",
        "model.ffn.trajectory=false",
        "model.ffn.balance_loss=uncorrected",
    ],
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_moue_trains_with_falling_loss(tmp_path, name):
    run = tmp_path / name
    train(
        tiny_config(
            run,
            *MOUE,
            *OPTIONS[name],
            "trainer.max_steps=30",
            "trainer.eval_every=30",
            "optim.lr=1e-2",
            "trainer.sample_tokens=0",
        )
    )
    rows = read_metrics(run)
    evals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert evals[-1] < evals[0] - 1.0, evals
    assert "moue/pool_load" in rows[-2] and rows[-2]["balance_loss"] > 0


def test_resume_restores_the_widening_state_exactly(tmp_path):
    widen = [
        *MOUE,
        "model.ffn.window_size=4",
        "model.ffn.widen_to=8",
        "model.ffn.widen_steps=8",
        "trainer.sample_tokens=0",
        "trainer.checkpoint_every=5",
        "trainer.max_steps=10",
        "schedule=constant",
    ]  # lr independent of max_steps
    train(tiny_config(tmp_path / "full", *widen))
    train(tiny_config(tmp_path / "cut", *widen, "trainer.max_steps=5"))
    _, state = ckpt.find_resume_checkpoint(tmp_path / "cut")
    assert state["model"][f"shared.modules_by_name.{POOL_NAME}._extra_state"].tolist() == [6]  # 4 + 4·5/8
    train(tiny_config(tmp_path / "cut", *widen))  # resumes at step 5
    losses = {run: [r["loss"] for r in read_metrics(tmp_path / run) if "loss" in r] for run in ("full", "cut")}
    assert losses["cut"][-5:] == losses["full"][-5:]


@pytest.mark.parametrize("experiment", ["moue", "moue_baseline"])
def test_presets_validate_and_accept_overrides(experiment):
    from training.cli import compose

    root = validate(compose([f"experiment={experiment}", "trainer.max_steps=7", "seed=3", "run_dir=/tmp/x"]))
    assert (root.experiment, root.trainer.max_steps, root.seed, root.run_dir) == (experiment, 7, 3, "/tmp/x")
    assert root.model.ffn["name"] == ("moue" if experiment == "moue" else "moe")


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("moe") / "run"
    train(
        tiny_config(
            run,
            "model/ffn=moe",
            "model.ffn.n_experts=4",
            "trainer.max_steps=10",
            "trainer.sample_tokens=0",
            "optim.lr=1e-2",
        )
    )
    return run


@pytest.mark.parametrize("router", ["per_layer", "shared"])
def test_converted_model_equals_its_source_moe_before_widening(moe_run, tmp_path, router):
    out = tmp_path / "moue"
    main([f"ckpt={moe_run}", f"out={out}", f"model.ffn.router_sharing={router}", "model.ffn.widen_to=8"])
    src, _, _, _ = load_trained(moe_run, "cpu")
    dst, _, root, path = load_trained(out, "cpu")
    assert path.name == "step_00000010.pt" and root.model.ffn["name"] == "moue"
    assert (root.model.ffn["n_universal"], root.model.ffn["window_size"], root.model.ffn["widen_start"]) == (8, 4, 10)
    pool = dst.shared.modules_by_name[POOL_NAME]
    assert torch.equal(
        pool.w_in_MDH, torch.cat([b.ffn.w_in_EDH for b in src.depth.blocks])
    )  # pool = union of the layers' experts
    assert [b.ffn.window() for b in dst.depth.blocks] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    idx = torch.randint(0, 257, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = src(idx, idx), dst(idx, idx)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.lm_loss, a.lm_loss)
    dst.after_optimizer_step(11)  # widening changes the function, as it should
    with torch.no_grad():
        assert not torch.allclose(dst(idx, idx).logits, a.logits)


def test_conversion_moves_adam_moments_and_continued_training_widens(moe_run, tmp_path, capsys):
    out = tmp_path / "moue"
    main(
        [
            f"ckpt={moe_run}",
            f"out={out}",
            "model.ffn.widen_to=8",
            "model.ffn.widen_steps=4",
            "trainer.max_steps=16",
            "train=true",
        ]
    )
    src_state = ckpt.load_checkpoint(moe_run / "checkpoints" / "step_00000010.pt")
    converted = ckpt.load_checkpoint(out / "checkpoints" / "step_00000010.pt")
    assert converted["sampler"] == src_state["sampler"] and converted["step"] == 10
    src, _, _, _ = load_trained(moe_run, "cpu")
    names = [n for n, _ in src.named_parameters()]
    dst_names = [n for n, _ in load_trained(out / "checkpoints" / "step_00000010.pt", "cpu")[0].named_parameters()]

    def moment(state, all_names, name):  # AdamW groups: ≥2-D non-embedding weights first, then the rest
        params = [i for g in state["optimizer"]["param_groups"] for i in g["params"]]
        return state["optimizer"]["state"][params[_group_order(state, all_names).index(name)]]["exp_avg"]

    pool_moment = moment(converted, dst_names, f"shared.modules_by_name.{POOL_NAME}.w_in_MDH")
    layer_moments = [moment(src_state, names, f"depth.blocks.{i}.ffn.w_in_EDH") for i in range(2)]
    assert torch.equal(pool_moment, torch.cat(layer_moments))
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(11, 17)) and all(
        torch.isfinite(torch.tensor(r["loss"])) for r in rows
    )
    assert [r["moue/window_size"] for r in rows] == [4, 5, 6, 7, 8, 8]  # the ramp, seen by each step's forward
    with pytest.raises(SystemExit):
        main([f"out={out}", "train=true"])  # nothing left to train: a clear one-line error
    assert "trainer.max_steps=16 must exceed the checkpoint's step 16" in capsys.readouterr().err


def _group_order(state, names):
    """Parameter names in optimizer index order (build_optimizer's decay / no-decay split)."""
    model = state["model"]
    decay = [n for n in names if model[n].dim() >= 2 and not n.startswith("embed.")]
    return decay + [n for n in names if n not in decay]


def test_conversion_refuses_unsupported_sources_and_existing_outputs(moe_run, tmp_path):
    dense = tmp_path / "dense"
    train(tiny_config(dense, "trainer.max_steps=2", "trainer.sample_tokens=0"))
    with pytest.raises(ConfigError, match="conversion needs one of"):
        convert(dense, tmp_path / "x")
    with pytest.raises(ckpt.CheckpointError, match="already holds checkpoints"):
        convert(moe_run, dense)


def test_conversion_reads_a_sharded_checkpoint_like_a_single_file(tmp_path):
    """A MoE saved as a DCP folder converts to the same weights and moved moments as the same run saved as .pt."""
    common = ["model/ffn=moe", "model.ffn.n_experts=4", "trainer.max_steps=6", "trainer.sample_tokens=0"]
    for fmt in ("torch", "dcp"):
        train(tiny_config(tmp_path / fmt, *common, f"trainer.checkpoint_format={fmt}", "trainer.checkpoint_every=6"))
        main([f"ckpt={tmp_path / fmt}", f"out={tmp_path / f'moue_{fmt}'}"])
    assert (tmp_path / "dcp" / "checkpoints" / "step_00000006").is_dir()  # the source really is sharded
    from_pt = ckpt.load_checkpoint(tmp_path / "moue_torch" / "checkpoints" / "step_00000006.pt")
    from_dcp = ckpt.load_checkpoint(tmp_path / "moue_dcp" / "checkpoints" / "step_00000006.pt")
    assert from_pt["model"].keys() == from_dcp["model"].keys()
    for name, tensor in from_pt["model"].items():
        torch.testing.assert_close(from_dcp["model"][name], tensor, rtol=0, atol=0, msg=name)
    moments = [s["optimizer"]["state"] for s in (from_pt, from_dcp)]
    assert moments[0].keys() == moments[1].keys() and moments[0]
    for index, per_param in moments[0].items():
        for key, value in per_param.items():
            torch.testing.assert_close(moments[1][index][key], value, rtol=0, atol=0)
