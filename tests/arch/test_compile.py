"""torch.compile of the default MoE model (issue 18, item 5): one graph, forward and backward, on CPU.

``fullgraph=True`` turns any graph break into an error; the dynamo counters are checked as well,
so a break that a future dynamo version tolerates silently still fails here. Compiled results
must match eager ones (the same loss and gradients up to the compiler's reassociation).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from tests.arch.test_host_sync import moe_tiny
from tests.helpers import tiny_config

pytestmark = pytest.mark.slow  # inductor compiles C++ kernels: ~15-20 s per case on the 2-core machine


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _loss_and_grads(model, idx_BT, collect_metrics):
    out = model(idx_BT[:, :-1], idx_BT[:, 1:], collect_metrics=collect_metrics)
    grads = torch.autograd.grad(out.loss, [p for p in model.parameters()], allow_unused=True)
    return out, grads


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_moe_tiny_compiles_to_one_graph_forward_and_backward(dtype, rtol):
    model, _ = moe_tiny()
    model.to(dtype)
    idx_BT = torch.randint(0, 257, (2, 33), generator=torch.Generator().manual_seed(0))
    eager, eager_grads = _loss_and_grads(model, idx_BT, True)
    compiled, grads = _loss_and_grads(torch.compile(model, fullgraph=True), idx_BT, True)
    assert dict(counters["graph_break"]) == {}
    assert math.isfinite(compiled.loss.item())
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=rtol, atol=rtol)
    assert set(compiled.metrics) == set(eager.metrics) and "moe/layer3/load" in compiled.metrics
    torch.testing.assert_close(compiled.metrics["moe/layer0/load"], eager.metrics["moe/layer0/load"])
    for got, want in zip(grads, eager_grads):
        if want is None:
            assert got is None
            continue
        scale = want.float().abs().max().clamp(min=1e-6)  # relative to the tensor's largest entry
        assert ((got.float() - want.float()).abs().max() / scale).item() < 10 * rtol


def test_trainer_compile_trains_like_eager(tmp_path):
    """trainer.compile=true: the same losses as the eager run (up to compiler rounding), falling."""
    from training.trainer import Trainer

    losses = {}
    for compile_ in ("false", "true"):
        trainer = Trainer(
            tiny_config(
                tmp_path / compile_,
                "model=moe_tiny",
                "model.d_model=32",
                "model.n_layers=2",
                "trainer.log_every=4",
                "optim.lr=1e-2",
                f"trainer.compile={compile_}",
            )
        )
        losses[compile_] = [trainer.train_step()["loss"].item() for _ in range(8)]
    assert dict(counters["graph_break"]) == {}
    assert all(math.isfinite(v) for v in losses["true"])
    assert losses["true"][-1] < losses["true"][0]
    torch.testing.assert_close(torch.tensor(losses["true"]), torch.tensor(losses["false"]), rtol=1e-3, atol=1e-3)
