"""The model sections of benchmarks.gpu_suite (see its docstring): host syncs per training step, dynamo
graph breaks and training-step MFU, on a MoE LM built directly (no Hydra). Each section is
``fn(suite, shapes)`` and adds rows through ``suite.case``; kernels are imported inside the functions so
--dry-run can set TRITON_INTERPRET first.

Legend: N tokens, k slots/token, E experts, D model width, F expert hidden width; B batch, T queries,
S keys, H query heads, Hk key/value heads, d head dim.
"""

from __future__ import annotations

import contextlib
import time
import warnings

import torch

from benchmarks.gpu_suite_kernels import attn_inputs, moe_inputs, perf_dtype


# ----------------------------------------------------------------------------- model (syncs, graph breaks, mfu)
def build_moe_lm(m: dict, device, backend="auto"):
    """The LM of conf/model/dense_124m.yaml with the default MoE FFN (conf/model/ffn/moe.yaml) in every layer:
    built from the plain ModelConfig dataclass, no Hydra. E experts top-k, expert width (8/3·d)/k."""
    from arch.model import LanguageModel
    from training.config_schema import ModelConfig

    cfg = ModelConfig(
        name="moe_124m",
        vocab_size=m["vocab"],
        d_model=m["d_model"],
        n_layers=m["n_layers"],
        n_heads=m["n_heads"],
        max_seq_len=m["seq_len"],
        attention={"name": "mha"},
        ffn={"name": "moe", "n_experts": m["E"], "top_k": m["k"], "backend": backend},
        depth={"name": "plain"},
    )
    return LanguageModel(cfg).to(device)


def _batch(m, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, m["vocab"], (m["batch"], m["seq_len"] + 1), generator=g).to(device)
    return x[:, :-1], x[:, 1:]


class HostReads:
    """Counts host reads of tensor values (each is a device→host sync on CUDA) while active."""

    NAMES = ("item", "__bool__", "__int__", "__float__", "tolist", "nonzero")

    def __enter__(self):
        self.count, self._saved = 0, {n: getattr(torch.Tensor, n) for n in self.NAMES}
        self._own = {n for n in self.NAMES if n in vars(torch.Tensor)}  # the rest are inherited from TensorBase
        self._nonzero = torch.nonzero
        for n, orig in self._saved.items():
            setattr(torch.Tensor, n, self._wrap(orig))
        torch.nonzero = self._wrap(self._nonzero)
        return self

    def _wrap(self, orig):
        def counted(*a, **kw):
            self.count += 1
            return orig(*a, **kw)

        return counted

    def __exit__(self, *exc):
        for n, orig in self._saved.items():
            if n in self._own:
                setattr(torch.Tensor, n, orig)
            else:
                delattr(torch.Tensor, n)
        torch.nonzero = self._nonzero


@contextlib.contextmanager
def sync_warnings(device):
    """Collects torch.cuda.set_sync_debug_mode('warn') warnings (CUDA only; empty list on CPU)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)


def syncs(suite, shapes):
    m, dev = shapes["SYNC_MODEL"], suite.device

    def run():
        model = build_moe_lm(m, dev).to(perf_dtype(suite))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
        x, y = _batch(m, dev)
        phases = ("forward", "backward", "optimizer")
        rows = []
        for step in range(2):  # step 0 warms up (autotuning syncs); step 1 is counted
            out = None
            for phase in phases:
                with sync_warnings(dev) as caught, HostReads() as reads:
                    if phase == "forward":
                        out = model(x, y)
                    elif phase == "backward":
                        out.loss.backward()
                    else:
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                    suite.sync()
                if step == 1:
                    msgs = sorted({str(w.message)[:120] for w in caught if "synchroniz" in str(w.message)})
                    rows.append(
                        {
                            "phase": phase,
                            "sync_warnings": sum("synchroniz" in str(w.message) for w in caught),
                            "host_reads": reads.count,
                            "first_messages": " | ".join(msgs[:3]),
                        }
                    )
        rows.append(
            {
                "phase": "step total",
                "sync_warnings": sum(r["sync_warnings"] for r in rows),
                "host_reads": sum(r["host_reads"] for r in rows),
            }
        )
        return rows

    suite.case("syncs", f"MoE LM train step ({m['n_layers']} layers, E {m['E']}, k {m['k']})", run)


def graph_breaks(suite, shapes):
    import torch._dynamo as dynamo

    # bf16 even in the dry run: the training dtype, and torch._grouped_mm's meta function accepts bf16 only
    dev, dt = suite.device, torch.bfloat16

    def explain(fn, *args):
        dynamo.reset()
        ex = dynamo.explain(fn)(*args)
        reasons = [" ".join(str(getattr(r, "reason", r)).split())[:160] for r in ex.break_reasons[:3]]
        return [{"graphs": ex.graph_count, "graph_breaks": ex.graph_break_count, "reasons": " | ".join(reasons)}]

    def moe():
        from kernels.moe import expert_mlp

        x, ids, gates, w_in, w_out = moe_inputs(**shapes["ACC_MOE"], dtype=dt, device=dev)
        return explain(lambda x: expert_mlp(x, ids, gates, w_in, w_out, "swiglu"), x.requires_grad_())

    def attn():
        from kernels.attention import attention

        q, k, v, _ = attn_inputs(**shapes["ACC_ATTN"], dtype=dt, device=dev)
        return explain(lambda q: attention(q, k, v), q.requires_grad_())

    def model():
        m = shapes["SYNC_MODEL"]
        lm = build_moe_lm(m, dev).to(dt)
        x, y = _batch(m, dev)
        return explain(lambda x, y: lm(x, y).loss, x, y)

    for name, fn in (("expert_mlp", moe), ("attention", attn), ("MoE LM loss", model)):
        suite.case("graph_breaks", name, fn)
    dynamo.reset()


def mfu(suite, shapes):
    """Tokens/s and MFU of full training steps (forward, backward, AdamW) with random tokens."""
    from training.accounting.account import account
    from training.accounting.hardware import peak_flops

    m, dev = shapes["MFU_MODEL"], suite.device
    precisions = {"bf16 weights": {"cast": perf_dtype(suite), "autocast": False}}
    if dev.type == "cuda":  # what the trainer does: fp32 master weights under bf16 autocast
        precisions["fp32 weights + bf16 autocast (trainer)"] = {"cast": torch.float32, "autocast": True}

    def run(p):
        model = build_moe_lm(m, dev).to(p["cast"])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
        x, y = _batch(m, dev)
        ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if p["autocast"] else contextlib.nullcontext

        def step():
            with ctx():
                loss = model(x, y).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(1 if suite.dry else 2):  # autotune + allocator warm-up
            step()
        suite.sync()
        t0 = time.perf_counter()
        for _ in range(m["steps"]):
            step()
        suite.sync()
        seconds = (time.perf_counter() - t0) / m["steps"]
        tokens = m["batch"] * m["seq_len"]
        fwd_per_token = account(model, m["seq_len"]).forward_flops_per_token
        peak = peak_flops(dev)
        achieved = 3 * fwd_per_token * tokens / seconds
        return [
            {
                "precision": name_of(p),
                "params": sum(t.numel() for t in model.parameters()),
                "fwd_flops_per_token": fwd_per_token,
                "tokens_per_step": tokens,
                "step_ms": seconds * 1e3,
                "tokens_per_s": tokens / seconds,
                "tflops": achieved / 1e12,
                "mfu": (achieved / peak) if peak else None,
                "peak_tflops": (peak / 1e12) if peak else None,
            }
        ]

    name_of = lambda p: next(n for n, q in precisions.items() if q is p)
    for name, p in precisions.items():
        suite.case("mfu", f"MoE LM {m['n_layers']}x{m['d_model']} E{m['E']} k{m['k']} ({name})", lambda p=p: run(p))
