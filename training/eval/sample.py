"""Generate text from a checkpoint: ``python -m training.eval.sample RUN_DIR_OR_CHECKPOINT --prompt "..."``."""

from __future__ import annotations

import sys

import torch

from training.errors import NonFiniteOutputError
from training.eval.loss import load_trained


def generate_text(
    model, tokenizer, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None, seed: int = 0
) -> str:
    """Prompt → prompt + continuation, sampled with the model's KV-cached ``generate``."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) or ([tokenizer.eos_id] if tokenizer.eos_id is not None else [0])
    ids = ids[-(model.cfg.max_seq_len - 1) :]
    room = model.cfg.max_seq_len - len(ids)
    generator = torch.Generator(device=device).manual_seed(seed)
    idx_BT = torch.tensor([ids], device=device)
    _check_finite_logits(model, idx_BT)
    try:
        out = model.generate(
            idx_BT,
            max_new_tokens=min(max_new_tokens, room),
            temperature=temperature,
            top_k=top_k,
            eos_id=tokenizer.eos_id,
            generator=generator,
        )
    except RuntimeError as e:  # multinomial on NaN/inf probabilities later in the sequence
        if "inf" in str(e) or "nan" in str(e):
            raise NonFiniteOutputError(f"the model produced non-finite logits while sampling ({e})") from e
        raise
    return tokenizer.decode(out[0].tolist())


@torch.no_grad()
def _check_finite_logits(model, idx_BT: torch.Tensor) -> None:
    """Refuse to sample from NaN/inf logits (greedy argmax would silently pick token 0), naming bad weights."""
    was_training = model.training
    model.eval()
    logits = model(idx_BT, last_position_only=True).logits  # what sampling draws from
    model.train(was_training)
    if torch.isfinite(logits).all():
        return
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    where = f"non-finite weights in {', '.join(bad[:5])}{' …' if len(bad) > 5 else ''}" if bad else "finite weights"
    raise NonFiniteOutputError(f"the model gives non-finite logits for the prompt ({where}); no sample written")


def main(argv: list[str] | None = None) -> int:
    from training.tool_args import parse, tool_parser

    parser = tool_parser("python -m training.eval.sample", __doc__)
    parser.add_argument("target", help="a run folder (uses its latest checkpoint) or a checkpoint .pt file")
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--tokens", type=int, default=200, help="new tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parse(parser, argv)
    try:
        model, data, _, _ = load_trained(args.target, args.device)
        text = generate_text(model, data.tokenizer, args.prompt, args.tokens, args.temperature, args.top_k, args.seed)
    except Exception as e:  # a clear one-line error instead of a traceback for bad input
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
