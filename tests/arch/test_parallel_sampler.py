"""The diffusion-style parallel sampler for recurrent-depth models (METHODS.md §8.6)."""

import pytest
import torch

from arch.model import LanguageModel
from training.config_schema import ModelConfig


def recurrent_model(seed: int = 0, **depth) -> LanguageModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=97, d_model=32, n_layers=4, n_heads=4, max_seq_len=64, depth={"name": "recurrent", **depth}
    )
    return LanguageModel(cfg).eval()


PROMPT = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))


def test_parallel_sampler_matches_sequential_greedy_when_freezing_forces_convergence():
    model = recurrent_model()
    model.depth.set_iterations(24)  # enough iterations for the (contractive, untrained) core to converge
    sequential = model.generate(PROMPT, 8, temperature=0)
    stats = {}
    parallel = model.generate(
        PROMPT,
        8,
        temperature=0,
        sampler="parallel",
        exit_threshold=1e-5,
        state_noise=0.0,
        ema_embeds=0.0,
        prefill_iterations=24,
        stats=stats,
    )
    assert torch.equal(parallel, sequential)
    assert stats["outer_steps"] > 0
    # A loose threshold freezes positions before their latents converge: fewer core iterations.
    loose = {}
    model.generate(
        PROMPT,
        8,
        temperature=0,
        sampler="parallel",
        exit_threshold=0.5,
        state_noise=0.0,
        ema_embeds=0.0,
        prefill_iterations=24,
        stats=loose,
    )
    assert loose["core_token_iterations"] < stats["core_token_iterations"]


def test_parallel_sampler_defaults_run_with_noise_ema_headway_and_a_small_wavefront():
    model = recurrent_model()
    gen = torch.Generator().manual_seed(0)
    out = model.generate(
        PROMPT, 7, temperature=1.0, top_k=5, generator=gen, sampler="parallel", headway=2, max_wavefront=3
    )
    assert out.shape == (2, 13) and torch.equal(out[:, :6], PROMPT)
    assert int(out.max()) < 97 and int(out.min()) >= 0
    greedy = model.generate(PROMPT[:1], 5, temperature=0, sampler="parallel")
    eos = int(greedy[0, 8])  # the third generated token
    stopped = model.generate(PROMPT[:1], 5, temperature=0, sampler="parallel", eos_id=eos)
    first = int((stopped[0, 6:] == eos).nonzero()[0, 0])
    assert stopped.shape[1] == 6 + first + 1  # ends at the first committed eos


def test_parallel_sampler_needs_a_recurrent_model_and_valid_options():
    torch.manual_seed(0)
    plain = LanguageModel(ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=64))
    with pytest.raises(ValueError, match="model.depth.name=recurrent"):
        plain.generate(PROMPT, 4, sampler="parallel")
    with pytest.raises(ValueError, match="sampler='beam'"):
        plain.generate(PROMPT, 4, sampler="beam")
    with pytest.raises(ValueError, match="inner_recurrence"):
        recurrent_model().generate(PROMPT, 4, sampler="parallel", inner_recurrence=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        recurrent_model().generate(PROMPT, 60, sampler="parallel")
