"""No host↔device synchronisation on the training hot path (issue 18, item 4).

Every way a tensor's value reaches Python is counted with a TorchFunctionMode: ``Tensor.item``,
``__bool__``, ``__int__``, ``__float__``, ``tolist``, ``nonzero``, and the ops whose output shape
depends on the data (boolean-mask indexing, ``masked_select``, ``bincount``, ``unique``,
``repeat_interleave`` without ``output_size``), which synchronise on CUDA as well. A training step
of the default MoE model (forward, backward, optimizer step, after-step hooks) must make none of
them; a logging step must read the router statistics.

Two reads are exempt, each only for host (CPU) tensors, so neither can hide a device sync:
  * ``torch.optim``: a non-fused AdamW keeps its per-parameter step counters as CPU scalars and
    reads them (on CUDA the trainer uses the fused AdamW, whose counters live on the device);
  * ``kernels/moe/torch_backend.py``: the CPU torch backend reads its per-expert row counts from
    host memory to size one matmul per expert (its docstring; on CUDA it takes the grouped path).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from kernels import triton_runnable
from tests.helpers import DATA_CACHE, tiny_config
from training.build import build_model
from training.cli import compose
from training.config import validate
from training.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[2]
HOST_READS = {
    torch.Tensor.item: "item",
    torch.Tensor.__bool__: "__bool__",
    torch.Tensor.__int__: "__int__",
    torch.Tensor.__float__: "__float__",
    torch.Tensor.__index__: "__index__",
    torch.Tensor.tolist: "tolist",
    torch.nonzero: "nonzero",
    torch.Tensor.nonzero: "nonzero",
    torch.argwhere: "argwhere",
    torch.masked_select: "masked_select",
    torch.Tensor.masked_select: "masked_select",
    torch.bincount: "bincount",
    torch.Tensor.bincount: "bincount",
    torch.unique: "unique",
    torch.Tensor.unique: "unique",
}
EXEMPT_HOST_READERS = ("torch/optim/", "kernels/moe/torch_backend.py")


@dataclass
class Read:
    name: str
    where: str  # innermost frame of this repository ("file:line in function"), or the innermost frame
    stack: tuple[str, ...]  # every frame's file:function, innermost last
    on_host: bool  # every tensor argument lives in CPU memory

    def exempt(self) -> bool:
        return self.on_host and any(reader in frame for frame in self.stack for reader in EXEMPT_HOST_READERS)


class CountHostReads(TorchFunctionMode):
    """Records every call that moves a tensor value (or a value-dependent shape) to the host."""

    def __init__(self):
        super().__init__()
        self.reads: list[Read] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = HOST_READS.get(func) or _data_dependent_shape(func, args, kwargs)
        if name:
            frames = traceback.extract_stack()[:-1]
            ours = [f for f in frames if f.filename.startswith(str(ROOT)) and f.filename != __file__]
            f = ours[-1] if ours else frames[-1]
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            where = f"{Path(f.filename).relative_to(ROOT) if ours else f.filename}:{f.lineno} in {f.name}"
            self.reads.append(
                Read(
                    name,
                    where,
                    tuple(f"{fr.filename}:{fr.name}" for fr in frames),
                    all(t.device.type == "cpu" for t in tensors),
                )
            )
        return func(*args, **kwargs)

    def device_reads(self) -> list[str]:
        return [f"{r.name} at {r.where}" for r in self.reads if not r.exempt()]


def _data_dependent_shape(func, args, kwargs) -> str | None:
    if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and len(args) > 1:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in index):
            return "boolean-mask indexing"
    if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave) and kwargs.get("output_size") is None:
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        if isinstance(repeats, torch.Tensor) or (len(args) == 1 and isinstance(args[0], torch.Tensor)):
            return "repeat_interleave without output_size"
    return None


def moe_tiny(*overrides: str):
    """The default MoE model (``model=moe_tiny``, every other setting its default) and its AdamW."""
    cfg = validate(
        compose(
            [
                "model=moe_tiny",
                "data.seq_len=32",
                "data.tokenizer.kind=bytes",
                "logger=none",
                f"data.cache_dir={DATA_CACHE}",
                "run_dir=unused",
                *overrides,
            ]
        )
    )
    torch.manual_seed(0)
    model = build_model(cfg, 257)
    return model, build_optimizer(model, cfg.optim, "cpu")


def train_step(model, optimizer, step: int, collect_metrics: bool):
    g = torch.Generator().manual_seed(step)
    idx_BT = torch.randint(0, 257, (2, 17), generator=g)
    out = model(idx_BT[:, :-1], idx_BT[:, 1:], collect_metrics=collect_metrics)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.after_optimizer_step(step)
    return out


TRITON = pytest.mark.skipif(
    not triton_runnable("cpu") and not torch.cuda.is_available(), reason="needs Triton (the interpreter or CUDA)"
)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param([], id="default"),  # backend auto: the torch backend on CPU
        pytest.param(
            ["model.ffn.bias_update_rate=0.01", "model.ffn.capacity_factor=1.0"], id="bias-balancing+capacity"
        ),
        # The interpreter costs seconds per step at moe_tiny's width: the same blocks, narrower and one layer.
        pytest.param(["model.ffn.backend=triton", "model.d_model=32", "model.n_layers=1"], id="triton", marks=TRITON),
    ],
)
def test_a_training_step_reads_nothing_from_the_device(options):
    model, optimizer = moe_tiny(*options)
    train_step(model, optimizer, 0, False)  # warm-up: one-time probes (e.g. the grouped-matmul check)
    counter = CountHostReads()
    with counter:
        for step in (1, 2) if "model.ffn.backend=triton" not in options else (1,):
            out = train_step(model, optimizer, step, collect_metrics=False)
    assert torch.isfinite(out.loss.detach()).all()
    assert out.metrics == {}  # not asked for: not computed
    assert counter.device_reads() == []
    if "model.ffn.bias_update_rate=0.01" in options:  # the bias update did run (and moved the biases)
        assert any(m.expert_bias_E.abs().sum() > 0 for m in model.modules() if hasattr(m, "expert_bias_E"))


def test_a_bf16_training_step_needs_no_exemption_for_the_experts():
    """In bf16 the torch backend runs the grouped path (device offsets, as on CUDA): no host reads at
    all in the expert MLP, so the CPU-only exemption above is not what makes the default test pass."""
    model, optimizer = moe_tiny()
    model.to(torch.bfloat16)
    train_step(model, optimizer, 0, False)
    counter = CountHostReads()
    with counter:
        train_step(model, optimizer, 1, collect_metrics=False)
    assert counter.device_reads() == []
    assert [r.where for r in counter.reads if "torch_backend" in r.where] == []


def test_router_statistics_stay_on_the_device_until_they_are_logged():
    from training.metrics import _plain

    model, optimizer = moe_tiny()
    counter = CountHostReads()
    with counter:
        out = train_step(model, optimizer, 0, collect_metrics=True)
    assert counter.device_reads() == []  # computed, but still device tensors
    loads = {k: v for k, v in out.metrics.items() if k.endswith("/load")}
    assert len(loads) == 4 and all(isinstance(v, torch.Tensor) and v.shape == (8,) for v in loads.values())
    with counter:  # what MetricsLogger.log does with every value of a log row
        row = {k: _plain(v) for k, v in out.metrics.items()}
    assert len(counter.device_reads()) >= len(out.metrics)
    assert all(sum(v) == pytest.approx(1.0, abs=1e-4) for k, v in row.items() if k.endswith("/load"))
    assert all(
        isinstance(row[k], float)
        for k in row
        if k.endswith(
            ("/router_entropy", "/load_entropy", "/max_load_ratio", "/min_load_ratio", "/dead_experts", "/dropped")
        )
    )


def test_trainer_reads_metrics_only_on_log_steps(tmp_path):
    """Trainer.train_step: off log steps the one host read is trainer.nonfinite's finite check; on a
    log step the model also returns the router statistics, which fit() then logs."""
    from training.trainer import Trainer

    trainer = Trainer(
        tiny_config(
            tmp_path / "run",
            "model=moe_tiny",
            "model.d_model=32",
            "model.n_layers=2",
            "trainer.log_every=3",
            "trainer.resume=none",
        )
    )
    trainer.train_step()  # step 1: warm-up
    counter = CountHostReads()
    with counter:
        quiet = trainer.train_step()  # step 2: not logged
    assert [r.split(" at ")[0] for r in counter.device_reads()] == ["__bool__"]
    assert "train_step" in counter.device_reads()[0] and "trainer.py" in counter.device_reads()[0]
    assert not any(k.startswith("moe/") for k in quiet)
    logged = trainer.train_step()  # step 3: logged
    assert {"moe/layer0/load", "moe/layer1/router_entropy", "balance_loss"} <= set(logged)
    assert "balance_loss" in quiet  # aux losses are part of the loss: always there
