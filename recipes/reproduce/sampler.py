"""The parallel-sampler check (METHODS.md §8.6): sequential vs diffusion-style decoding of a trained recurrent model.

    python -m recipes.reproduce.sampler ckpt=runs/recurrent out=runs/recurrent/sampler [prompts=4 new_tokens=32
        iterations=16 seed=0]

Greedy (temperature 0) continuations of ``prompts`` validation windows (``prompt_len`` tokens each) with
both samplers of ``LanguageModel.generate``, the model set to ``iterations`` test-time core iterations
(sequential decoding runs that many per token; the parallel sampler prefills with it). The default 16
is 4× the training mean r̄ = 4: the sampler's advantage is over many iterations (Huginn decodes at
r = 32 with inner_recurrence 4); at r = r̄ = 4 one outer step already costs as much as a sequential
token. Writes ``sampler.json``:
  passes_sequential / passes_parallel   sequential core passes per generated token: the sequential sampler runs
                                        r̄ core iterations for every token; the parallel one runs ``inner_recurrence``
                                        iterations per outer step (all wavefront positions at once), so
                                        outer_steps · inner_recurrence / new tokens
  ms_per_token_sequential / _parallel   wall time per generated token (one thread, after one warm-up call)
  agreement                             fraction of generated tokens identical between the two samplers
  nll_sequential / nll_parallel         mean NLL (nats) of each continuation under the model at ``iterations``,
                                        teacher-forced: "same output quality"
Legend: B prompts, T prompt length, N new tokens, V vocab.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class SamplerOptions:
    ckpt: str = ""
    out: str = ""
    prompts: int = 4
    prompt_len: int = 32
    new_tokens: int = 32
    iterations: int = 16
    seed: int = 0
    threads: int = 1

    HELP = {
        "ckpt": "recurrent-depth run folder or checkpoint",
        "out": "folder for sampler.json",
        "prompts": "validation prompts",
        "iterations": "test-time core iterations (sequential per token; parallel prefill)",
        "prompt_len": "tokens per prompt",
        "new_tokens": "tokens generated per prompt",
        "seed": "which validation windows",
        "threads": "torch threads",
    }


def continuation_nll(model, idx_BS, prompt_len: int, seed: int | None = None) -> float:
    """Mean NLL of tokens [prompt_len, S) of idx_BS given everything before them (one teacher-forced pass).

    ``seed`` seeds torch's RNG first (a recurrent model draws its initial state at every forward)."""
    import torch
    import torch.nn.functional as F

    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        logits_BSV = model(idx_BS[:, :-1]).logits.float()
    targets_BS = idx_BS[:, 1:]
    nll_BS = F.cross_entropy(logits_BSV.transpose(1, 2), targets_BS, reduction="none")
    return float(nll_BS[:, prompt_len - 1 :].mean())


def measure(o: SamplerOptions) -> dict:
    import numpy as np
    import torch

    from training.eval.loss import load_trained

    if not o.ckpt or not o.out:
        raise ValueError(f"sampler needs ckpt= and out= (got ckpt={o.ckpt!r}, out={o.out!r})")
    if min(o.prompts, o.prompt_len, o.new_tokens, o.iterations) < 1:
        raise ValueError(
            f"prompts, prompt_len, new_tokens and iterations must be >= 1, got {o.prompts}, {o.prompt_len}, "
            f"{o.new_tokens}, {o.iterations}"
        )
    torch.set_num_threads(o.threads)
    model, data, root, _ = load_trained(o.ckpt, "cpu")
    depth = model.depth
    if not hasattr(depth, "set_iterations"):
        raise ValueError(f"ckpt={o.ckpt!r} is not a recurrent-depth model (model.depth.name=recurrent)")
    depth.set_iterations(o.iterations)
    rng = np.random.default_rng(o.seed)
    starts = rng.integers(0, len(data.val) - o.prompt_len - 1, size=o.prompts)
    prompts_BT = torch.stack([torch.as_tensor(data.val[s : s + o.prompt_len].astype(np.int64)) for s in starts])
    model.generate(prompts_BT[:1, :4], 2, temperature=0.0)  # warm-up (allocations, first-call overheads)
    t0 = time.perf_counter()
    seq_BS = model.generate(prompts_BT, o.new_tokens, temperature=0.0)
    seq_s = time.perf_counter() - t0
    stats: dict = {}
    t0 = time.perf_counter()
    par_BS = model.generate(prompts_BT, o.new_tokens, temperature=0.0, sampler="parallel", stats=stats)
    par_s = time.perf_counter() - t0
    generated = o.prompts * o.new_tokens
    inner = 4  # generate_parallel's default inner_recurrence, used above
    out = {
        "prompts": o.prompts,
        "prompt_len": o.prompt_len,
        "new_tokens": o.new_tokens,
        "eval_iterations": depth.eval_iterations,
        "passes_sequential": float(depth.eval_iterations),
        "passes_parallel": stats["outer_steps"] * inner / generated,
        "outer_steps": stats["outer_steps"],
        "core_token_iterations": stats["core_token_iterations"],
        "ms_per_token_sequential": 1000 * seq_s / generated,
        "ms_per_token_parallel": 1000 * par_s / generated,
        "agreement": float((seq_BS[:, o.prompt_len :] == par_BS[:, o.prompt_len :]).float().mean()),
        # the recurrent state starts random each forward: the same draws for both continuations (same shapes)
        "nll_sequential": continuation_nll(model, seq_BS, o.prompt_len, seed=o.seed),
        "nll_parallel": continuation_nll(model, par_BS[:, : seq_BS.shape[1]], o.prompt_len, seed=o.seed),
    }
    Path(o.out).mkdir(parents=True, exist_ok=True)
    (Path(o.out) / "sampler.json").write_text(json.dumps(out, indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    from training.tool_args import add_dataclass_options, dataclass_from, parse, tool_parser

    parser = tool_parser("python -m recipes.reproduce.sampler", __doc__.split("\n\n")[0])
    add_dataclass_options(parser, SamplerOptions)
    print(
        json.dumps(
            measure(dataclass_from(parse(parser, sys.argv[1:] if argv is None else argv), SamplerOptions)), indent=1
        )
    )


if __name__ == "__main__":
    main()
