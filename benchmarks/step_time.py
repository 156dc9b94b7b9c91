"""Framework overhead: training tokens/s of ``Trainer.train_step`` vs a minimal hand-written loop.

Both train the same dense LLaMA-style shape (RMSNorm, RoPE, SDPA causal attention, SwiGLU, tied
head) with AdamW and gradient clipping on the same token stream. The hand-written loop below is
written independently of ``arch/`` (nanoGPT-style). Runs alternate (framework, hand-written,
framework, …) so machine noise hits both arms of a pair; the ratio is computed per pair and
reported as the median with its min..max spread. Target: ratio framework / hand-written ≥ 0.9.

    python -m benchmarks.step_time [--shape tiny|small] [--steps 20] [--repeats 5] [--out DIR] [--check]
Writes <out>/step_time_<shape>.csv and .png (default out: benchmarks/results/local/); --check exits 1
when the median paired ratio misses the target.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.common import add_output_options, environment, paired_ratios, save_boxplot, target_line, write_csv

TARGET = 0.9  # framework / hand-written tokens per second

# (name, d_model, n_layers, n_heads, seq_len, batch_size, vocab)
SHAPES = {
    "tiny": (128, 4, 4, 256, 16, 2048),
    "small": (256, 6, 8, 256, 8, 2048),
}


# ----------------------------------------------------------------------------- hand-written baseline
class HandBlock(nn.Module):
    def __init__(self, d, n_heads, hidden):
        super().__init__()
        self.n_heads = n_heads
        self.n1, self.n2 = nn.RMSNorm(d, eps=1e-5), nn.RMSNorm(d, eps=1e-5)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.gate_up = nn.Linear(d, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, D = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, T, 3, self.n_heads, D // self.n_heads).unbind(2)

        def rope(t):
            a, b = t.chunk(2, -1)
            return torch.cat((a * cos - b * sin, a * sin + b * cos), -1)

        q, k = rope(q), rope(k)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        g, u = self.gate_up(self.n2(x)).chunk(2, -1)
        return x + self.down(F.silu(g) * u)


class HandGPT(nn.Module):
    def __init__(self, vocab, d, n_layers, n_heads, seq_len, hidden):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(HandBlock(d, n_heads, hidden) for _ in range(n_layers))
        self.norm = nn.RMSNorm(d, eps=1e-5)
        hd = d // n_heads
        freqs = torch.outer(torch.arange(seq_len).float(), 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd))
        self.register_buffer("cos", freqs.cos()[None, :, None, :])
        self.register_buffer("sin", freqs.sin()[None, :, None, :])
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0, 0.02)

    def forward(self, idx, targets):
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        logits = self.norm(x) @ self.emb.weight.T
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def hand_written_runner(shape, tokens):
    d, n_layers, n_heads, seq_len, batch, vocab = shape
    hidden = 32 * math.ceil(int(8 * d / 3) / 32)
    torch.manual_seed(0)
    model = HandGPT(vocab, d, n_layers, n_heads, seq_len, hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)

    def step():
        starts = torch.randint(0, len(tokens) - seq_len - 1, (batch,), generator=gen)
        window = torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])
        loss = model(window[:, :-1], window[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


# ----------------------------------------------------------------------------- the framework
def framework_runner(shape, run_dir):
    from training.cli import compose
    from training.trainer import Trainer

    d, n_layers, n_heads, seq_len, batch, vocab = shape
    cfg = compose(
        [
            "model=dense_tiny",
            f"model.d_model={d}",
            f"model.n_layers={n_layers}",
            f"model.n_heads={n_heads}",
            f"data.seq_len={seq_len}",
            f"data.tokenizer.vocab_size={vocab}",
            f"trainer.batch_size={batch}",
            "trainer.progress=false",
            f"run_dir={run_dir}",
            "logger=none",
            "trainer.max_steps=100000",
        ]
    )
    trainer = Trainer(cfg)
    tokens = torch.from_numpy(trainer.data.train[:2_000_000].astype("int64"))

    def step():
        return trainer.train_step()["loss"].item()

    return step, tokens


def tokens_per_second(step, n_steps, tokens_per_step, warmup=3):
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    return n_steps * tokens_per_step / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved (framework, hand-written) pairs")
    add_output_options(parser)
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    tokens_per_step = shape[3] * shape[4]

    with tempfile.TemporaryDirectory() as run_dir:
        framework_step, tokens = framework_runner(shape, run_dir)
        hand_step = hand_written_runner(shape, tokens)
        framework, hand = [], []
        for _ in range(args.repeats):
            framework.append(tokens_per_second(framework_step, args.steps, tokens_per_step))
            hand.append(tokens_per_second(hand_step, args.steps, tokens_per_step))
    env = environment()
    summary = paired_ratios(framework, hand)
    row = {
        "shape": args.shape,
        "d_model": shape[0],
        "n_layers": shape[1],
        "n_heads": shape[2],
        "seq_len": shape[3],
        "batch_size": shape[4],
        "vocab": shape[5],
        "framework_tokens_per_s": round(statistics.median(framework), 1),
        "hand_written_tokens_per_s": round(statistics.median(hand), 1),
        "ratio_median": round(summary["median"], 4),
        "ratio_min": round(summary["min"], 4),
        "ratio_max": round(summary["max"], 4),
        "pairs": summary["pairs"],
        "target": TARGET,
        **env,
    }
    path = write_csv(f"step_time_{args.shape}", [row], args.out)
    save_boxplot(
        {"framework": framework, "hand-written": hand},
        "training tokens/s",
        f"{args.shape}: paired ratio {summary['median']:.3f}\n{env['device']}",
        f"step_time_{args.shape}",
        args.out,
    )
    line, met = target_line("ratio framework / hand-written (per pair)", summary, TARGET)
    print(f"device: {env['device']}  torch {env['torch']}")
    print(f"framework:     {[round(v) for v in framework]} tokens/s")
    print(f"hand-written:  {[round(v) for v in hand]} tokens/s")
    print(f"{line}  → {path}")
    if args.check and not met:
        sys.exit(1)
    return summary


if __name__ == "__main__":
    main()
