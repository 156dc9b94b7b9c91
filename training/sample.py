"""Generate text from a checkpoint: ``python -m training.sample RUN_DIR_OR_CHECKPOINT --prompt "..."``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None, seed: int = 0) -> str:
    """Prompt → prompt + continuation, sampled with the model's KV-cached ``generate``."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) or ([tokenizer.eos_id] if tokenizer.eos_id is not None else [0])
    ids = ids[-(model.cfg.max_seq_len - 1):]
    room = model.cfg.max_seq_len - len(ids)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(
        torch.tensor([ids], device=device),
        max_new_tokens=min(max_new_tokens, room),
        temperature=temperature,
        top_k=top_k,
        eos_id=tokenizer.eos_id,
        generator=generator,
    )
    return tokenizer.decode(out[0].tolist())


def load_for_sampling(target: str | Path, device: str = "auto"):
    """(model, tokenizer, config) from a run folder (its latest checkpoint) or a checkpoint file."""
    from training import checkpoint as ckpt
    from training.config import validate
    from training.data import prepare_data
    from training.trainer import build_model, resolve_device

    target = Path(target)
    if target.is_dir():
        found = ckpt.find_resume_checkpoint(target)
        if found is None:
            raise ckpt.CheckpointError(f"no usable checkpoint in {target / ckpt.CHECKPOINT_DIR}")
        _, state = found
    else:
        state = ckpt.load_checkpoint(target)
    root = validate(state["config"])
    data = prepare_data(root.data, progress=False)
    model = build_model(root, data.tokenizer.vocab_size)
    model.load_state_dict(state["model"])
    model.to(resolve_device(device)).eval()
    return model, data.tokenizer, root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target", help="a run folder (uses its latest checkpoint) or a checkpoint .pt file")
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--tokens", type=int, default=200, help="new tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    try:
        model, tokenizer, _ = load_for_sampling(args.target, args.device)
    except Exception as e:  # a clear one-line error instead of a traceback for bad input
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(generate_text(model, tokenizer, args.prompt, args.tokens, args.temperature, args.top_k, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
