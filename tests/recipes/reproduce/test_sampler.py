"""recipes.reproduce.sampler: the parallel-sampler measurement on a tiny trained recurrent-depth run."""

import json
import math

import pytest
import torch

from recipes.reproduce import sampler
from tests.helpers import DATA_CACHE, TINY

RECURRENT = [
    *TINY,
    "model/depth=recurrent",
    "model.n_layers=3",
    "model.depth.prelude_layers=1",
    "model.depth.core_layers=1",
    "model.depth.coda_layers=1",
    "trainer.max_steps=4",
    "trainer.eval_every=4",
    "trainer.sample_tokens=0",
    f"data.cache_dir={DATA_CACHE}",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from training.cli import compose
    from training.trainer import train

    folder = tmp_path_factory.mktemp("recurrent")
    train(compose([*RECURRENT, f"run_dir={folder}"]))
    return folder


def test_sampler_counts_passes_and_scores_both_continuations(run, tmp_path):
    opts = sampler.SamplerOptions(ckpt=str(run), out=str(tmp_path), prompts=2, prompt_len=8, new_tokens=6, iterations=8)
    out = sampler.measure(opts)
    assert json.loads((tmp_path / "sampler.json").read_text()) == out
    assert out["passes_sequential"] == 8.0 and out["eval_iterations"] == 8
    assert out["passes_parallel"] == pytest.approx(out["outer_steps"] * 4 / (2 * 6))
    assert 0.0 <= out["agreement"] <= 1.0 and out["ms_per_token_sequential"] > 0 and out["ms_per_token_parallel"] > 0
    assert math.isfinite(out["nll_sequential"]) and math.isfinite(out["nll_parallel"])
    with pytest.raises(ValueError, match="iterations"):
        sampler.measure(sampler.SamplerOptions(ckpt=str(run), out=str(tmp_path), iterations=0))


def test_continuation_nll_matches_a_token_by_token_reference(run):
    from training.eval.loss import load_trained

    model, *_ = load_trained(run, "cpu")
    model.depth.state_init = "zero"  # a deterministic initial state, so that separate forwards agree
    torch.manual_seed(0)
    idx_BS = torch.randint(0, model.cfg.vocab_size, (2, 12))
    prompt_len = 5
    with torch.no_grad():  # reference: one prefix at a time, the last position's log-probability of the next token
        nll = [
            -torch.log_softmax(model(idx_BS[:, :t]).logits[:, -1].float(), -1)[torch.arange(2), idx_BS[:, t]]
            for t in range(prompt_len, 12)
        ]
    assert sampler.continuation_nll(model, idx_BS, prompt_len) == pytest.approx(
        float(torch.stack(nll).mean()), rel=1e-4
    )
