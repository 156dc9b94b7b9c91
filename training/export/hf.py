"""Export a trained checkpoint as a Hugging Face ``transformers`` model folder.

    python -m training.export.hf RUN_DIR_OR_CHECKPOINT OUT_DIR [--dtype fp32|bf16] [--format auto|native|remote_code]

writes ``config.json``, ``model.safetensors``, ``generation_config.json`` (via ``save_pretrained``)
and the tokenizer (``tokenizer.json`` + ``tokenizer_config.json``), so that
``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` and ``AutoTokenizer.from_pretrained(OUT_DIR)`` work.

Only architectures that a stock ``transformers`` class computes *exactly* are exported:

- dense: attention=mha, ffn=swiglu, depth=plain → ``LlamaForCausalLM``
- MoE: attention=mha (no bias), ffn=moe/emoe with Mixtral's routing, depth=plain → ``MixtralForCausalLM``

Anything else raises :class:`UnsupportedArchitectureError` naming every offending setting with
``--format native``; the default ``--format auto`` then writes the package of
``training.export.remote_code`` instead (our own modelling code, loaded with ``trust_remote_code=True``).

Conventions checked against transformers' Llama/Mixtral code (and by tests/training/export/test_hf_export.py):
- RoPE: ``arch.layers.apply_rope`` rotates the halves (x[:d/2], x[d/2:]), which is HF's
  ``rotate_half``, with the same inverse frequencies θ^(-2i/d); so q/k rows are copied without
  the interleaved→half permutation that ``convert_llama_weights_to_hf`` needs for Meta weights.
- RMSNorm multiplies by ``w`` (not 1 + w); eps = ``model.norm_eps``; no embedding or logit scaling.
- Attention scale d^-1/2; the GQA map h // (H/Hk) is HF's ``repeat_kv``.
- ``wkv`` rows are [K heads | V heads]; ``w_gate_up`` rows are [gate | up].
- MoE: softmax over all E router logits → top-k → the k weights renormalised to sum 1, which is
  our ``scoring=softmax, renormalize=true``. ``w_in_EDH`` (E, D, 2F) holds [gate | up] columns,
  ``w_out_EFD`` (E, F, D) the down projection; HF stores their transposes (w1 / w3 / w2).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from arch.registry import REGISTRIES
from training.export.tokenizer_files import save_tokenizer, tokenizer_backend  # noqa: F401  (re-exported)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class UnsupportedArchitectureError(ValueError):
    """The model cannot be expressed exactly as a transformers Llama or Mixtral model."""


# Every option the mapping below accounts for: either it maps onto the HF config, it only acts in
# training (losses, noise, sampling, schedules), or check_exportable checks its value. Each block
# lists its own in ``capabilities.hf_export`` (arch/registry.py); an option added to a block later
# is refused until someone decides how it exports and adds it there.
KNOWN_MODEL_FIELDS = {
    "name",
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "max_seq_len",
    "tie_embeddings",
    "norm_eps",
    "rope_theta",
    "init_std",
    "attention",
    "ffn",
    "depth",
}


# ----------------------------------------------------------------------------- what is exportable


def check_exportable(model) -> str:
    """'llama' or 'mixtral' for a model that exports exactly; else UnsupportedArchitectureError listing every
    problem."""
    cfg = model.cfg
    attention, ffn, depth = dict(cfg.attention), dict(cfg.ffn), dict(cfg.depth)
    problems: list[str] = []
    if depth["name"] != "plain":
        problems.append(f"model.depth.name={depth['name']!r} (only 'plain': HF runs each layer once, in order)")
    if attention["name"] != "mha":
        problems.append(f"model.attention.name={attention['name']!r} (only 'mha', with any n_kv_heads)")
    elif attention.get("qk_norm"):
        problems.append("model.attention.qk_norm=true (Llama/Mixtral have no q/k norm; only qk_norm=false)")
    if ffn["name"] == "swiglu":
        kind = "llama"
    elif ffn["name"] in ("moe", "emoe"):
        kind = "mixtral"
        problems += _mixtral_problems(model, ffn)
        if attention.get("bias"):
            problems.append(
                "model.attention.bias=true with an MoE FFN (Mixtral's projections have no bias; only bias=false)"
            )
    else:
        kind = "unsupported"
        problems.append(f"model.ffn.name={ffn['name']!r} (only 'swiglu' → Llama, or 'moe'/'emoe' → Mixtral)")
    for group, node in (("attention", attention), ("ffn", ffn), ("depth", depth)):
        mapped = REGISTRIES[group].capabilities(node["name"]).hf_export
        unknown = sorted(set(node) - {"name"} - set(node if mapped is None else mapped))
        problems += [f"model.{group}.{key} (an option the exporter does not know how to map)" for key in unknown]
    fields = cfg.__dataclass_fields__ if hasattr(cfg, "__dataclass_fields__") else {}
    problems += [
        f"model.{key} (a model setting the exporter does not know how to map)"
        for key in sorted(set(fields) - KNOWN_MODEL_FIELDS)
    ]
    if not model.elastic.is_full:
        problems.append("an elastic sub-network is active (reset with model.set_elastic())")
    if problems:
        raise UnsupportedArchitectureError(
            "cannot export to Hugging Face without changing the logits: "
            + "; ".join(problems)
            + ". Supported: attention=mha + ffn=swiglu + depth=plain (LlamaForCausalLM), or attention=mha (no bias) + "
            "ffn=moe/emoe with scoring=softmax, renormalize=true, router=linear, n_shared_experts=0, "
            "capacity_factor=null, "
            "zero expert bias + depth=plain (MixtralForCausalLM)."
        )
    return kind


def _mixtral_problems(model, ffn: dict) -> list[str]:
    """The settings of an MoE FFN that change inference away from Mixtral's routing."""
    problems = []
    wanted = {
        "scoring": "softmax",
        "renormalize": True,
        "router": "linear",
        "n_shared_experts": 0,
        "capacity_factor": None,
        "eval_capacity_fraction": None,
    }
    for key, value in wanted.items():
        if key in ffn and ffn[key] != value:
            problems.append(f"model.ffn.{key}={ffn[key]!r} (Mixtral needs {json.dumps(value)})")
    moe_layers = [m for m in model.modules() if hasattr(m, "w_in_EDH") and hasattr(m, "expert_bias_E")]
    if any(m.w_in_EDH.shape[0] != m.E for m in moe_layers):
        problems.append(
            "expert-parallel shards (each rank holds a slice of the experts; export from load_trained's full model)"
        )
    if any(bool(m.expert_bias_E.any()) for m in moe_layers):
        problems.append(
            "a nonzero expert selection bias from model.ffn.bias_update_rate > 0 (Mixtral selects by probability alone)"
        )
    return problems


# ----------------------------------------------------------------------------- config and weights


def hf_config(model, kind: str, tokenizer=None):
    """The transformers LlamaConfig / MixtralConfig with our model's shapes and conventions."""
    from transformers import LlamaConfig, MixtralConfig

    cfg, first = model.cfg, model.depth.blocks[0]
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=first.attn.n_kv_heads,
        head_dim=first.attn.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=float(cfg.rope_theta),  # transformers 5 turns this into rope_parameters
        tie_word_embeddings=bool(cfg.tie_embeddings),
        initializer_range=cfg.init_std,
        bos_token_id=None,  # we train without BOS
        eos_token_id=getattr(tokenizer, "eos_id", None),
        pad_token_id=None,
        attention_dropout=0.0,
    )
    if kind == "llama":
        return LlamaConfig(
            **common,
            intermediate_size=first.ffn.hidden_dim,
            attention_bias=first.attn.wq.bias is not None,
            mlp_bias=first.ffn.w_down.bias is not None,
        )
    moe = first.ffn
    return MixtralConfig(
        **common,
        intermediate_size=moe.F,
        num_local_experts=moe.E,
        num_experts_per_tok=moe.eval_top_k or moe.top_k,  # what our eval-mode forward uses
        sliding_window=None,
        router_jitter_noise=0.0,
        output_router_logits=False,
    )


def hf_state_dict(model, kind: str, hf_keys: set[str]) -> dict[str, torch.Tensor]:
    """Our tensors under the HF model's parameter names; raises if any of ours would be left behind."""
    ours = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return ours[name].detach()

    out = {"model.embed_tokens.weight": take("embed.weight"), "model.norm.weight": take("norm.weight")}
    out["lm_head.weight"] = take("lm_head.weight")  # the same tensor as the embedding when tied
    for i, block in enumerate(model.depth.blocks):
        src, dst = f"depth.blocks.{i}", f"model.layers.{i}"
        out[f"{dst}.input_layernorm.weight"] = take(f"{src}.attn_norm.weight")
        out[f"{dst}.post_attention_layernorm.weight"] = take(f"{src}.ffn_norm.weight")
        kv_rows = block.attn.n_kv_heads * block.attn.head_dim
        for suffix in ("weight", "bias"):
            if f"{src}.attn.wq.{suffix}" not in ours:
                continue
            out[f"{dst}.self_attn.q_proj.{suffix}"] = take(f"{src}.attn.wq.{suffix}")
            k, v = take(f"{src}.attn.wkv.{suffix}").split(kv_rows)  # rows: [K heads | V heads]
            out[f"{dst}.self_attn.k_proj.{suffix}"], out[f"{dst}.self_attn.v_proj.{suffix}"] = k, v
            out[f"{dst}.self_attn.o_proj.{suffix}"] = take(f"{src}.attn.wo.{suffix}")
        if kind == "llama":
            for suffix in ("weight", "bias"):
                if f"{src}.ffn.w_gate_up.{suffix}" not in ours:
                    continue
                gate, up = take(f"{src}.ffn.w_gate_up.{suffix}").chunk(2)  # rows: [gate | up]
                out[f"{dst}.mlp.gate_proj.{suffix}"], out[f"{dst}.mlp.up_proj.{suffix}"] = gate, up
                out[f"{dst}.mlp.down_proj.{suffix}"] = take(f"{src}.ffn.w_down.{suffix}")
        else:
            used.add(f"{src}.ffn.expert_bias_E")  # checked to be zero by check_exportable
            out.update(
                _mixtral_experts(
                    dst,
                    take(f"{src}.ffn.router.proj.weight"),
                    take(f"{src}.ffn.w_in_EDH"),
                    take(f"{src}.ffn.w_out_EFD"),
                    hf_keys,
                )
            )
    left = sorted(set(ours) - used)
    if left:  # a parameter we do not map would silently be dropped: refuse instead
        raise UnsupportedArchitectureError(f"the export does not map these model tensors: {left[:8]}")
    return out


def _mixtral_experts(
    dst: str, router_ED: torch.Tensor, w_in_EDH: torch.Tensor, w_out_EFD: torch.Tensor, hf_keys: set[str]
) -> dict:
    """Router and experts under the installed transformers' names: fused (v5) or one Linear per expert (v4)."""
    F = w_out_EFD.shape[1]
    if f"{dst}.mlp.experts.gate_up_proj" in hf_keys:  # transformers >= 5: (E, 2F, D) and (E, D, F)
        return {
            f"{dst}.mlp.gate.weight": router_ED,
            f"{dst}.mlp.experts.gate_up_proj": w_in_EDH.transpose(1, 2).contiguous(),
            f"{dst}.mlp.experts.down_proj": w_out_EFD.transpose(1, 2).contiguous(),
        }
    prefix = f"{dst}.block_sparse_moe"
    out = {f"{prefix}.gate.weight": router_ED}
    for e in range(w_in_EDH.shape[0]):
        out[f"{prefix}.experts.{e}.w1.weight"] = w_in_EDH[e, :, :F].T.contiguous()  # gate
        out[f"{prefix}.experts.{e}.w3.weight"] = w_in_EDH[e, :, F:].T.contiguous()  # up
        out[f"{prefix}.experts.{e}.w2.weight"] = w_out_EFD[e].T.contiguous()  # down
    return out


def to_hf_model(model, tokenizer=None):
    """An fp32 transformers model (eval mode) that computes exactly what ``model`` computes."""
    from transformers import AutoModelForCausalLM

    kind = check_exportable(model)
    config = hf_config(model, kind, tokenizer)
    hf_model = AutoModelForCausalLM.from_config(config)
    hf_model.load_state_dict(hf_state_dict(model, kind, set(hf_model.state_dict())), strict=True)
    if config.tie_word_embeddings:
        hf_model.tie_weights()
    return hf_model.float().eval()


# ----------------------------------------------------------------------------- tokenizer


def export_model(model, out_dir: str | Path, tokenizer=None, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``model`` (and ``tokenizer`` when expressible) as a transformers folder at ``out_dir``.

    The architecture is checked before anything is written.
    """
    hf_model = to_hf_model(model, tokenizer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_model.to(dtype).save_pretrained(str(out_dir))
    # Readers on transformers 4.x look for a top-level rope_theta (5.x reads rope_parameters).
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("rope_theta", float(model.cfg.rope_theta))
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None and not save_tokenizer(tokenizer, out_dir, model.cfg.max_seq_len):
        print(f"note: {tokenizer!r} has no Hugging Face form; only the model was exported", file=sys.stderr)
    return out_dir


FORMATS = ("auto", "native", "remote_code")


def export_checkpoint(target: str | Path, out_dir: str | Path, dtype: str = "fp32", format: str = "auto") -> Path:
    """Load a run folder (its newest checkpoint) or a .pt file and export it.

    ``format=native``: a stock Llama / Mixtral folder (:func:`export_model`; refused for other blocks);
    ``remote_code``: the package of ``training.export.remote_code`` (any block, ``trust_remote_code=True``);
    ``auto``: native when the architecture allows it, else remote_code."""
    from dataclasses import asdict

    from training.eval.loss import load_trained
    from training.export.remote_code import export_remote_code

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    if format not in FORMATS:
        raise ValueError(f"--format {format!r} is not one of {list(FORMATS)}")
    model, data, root, path = load_trained(target, device="cpu")
    if format == "native" or (format == "auto" and _natively_exportable(model)):
        return export_model(model, out_dir, data.tokenizer, DTYPES[dtype])
    return export_remote_code(
        model, out_dir, data.tokenizer, DTYPES[dtype], run_config=asdict(root), final_metrics=_final_metrics(Path(path))
    )


def _natively_exportable(model) -> bool:
    try:
        check_exportable(model)
        return True
    except UnsupportedArchitectureError:
        return False


def _final_metrics(checkpoint: Path) -> dict:
    """The last eval row of the run whose checkpoint this is (for the model card), if its folder has one."""
    from training.metrics import read_metrics

    for run_dir in (checkpoint.parent.parent, checkpoint.parent):
        if (run_dir / "metrics.jsonl").is_file():
            evals = [r for r in read_metrics(run_dir) if "val_loss" in r]
            return (
                {k: evals[-1][k] for k in ("step", "val_loss", "val_ppl", "val_bpb") if k in evals[-1]} if evals else {}
            )
    return {}


def main(argv: list[str] | None = None) -> int:
    from training.tool_args import parse, tool_parser

    parser = tool_parser("python -m training.export.hf", __doc__.split("\n\n")[0])
    parser.add_argument("target", help="a run folder (uses its newest checkpoint) or a checkpoint .pt file")
    parser.add_argument("out_dir", help="folder to write config.json, model.safetensors and the tokenizer into")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the saved weights")
    parser.add_argument(
        "--format",
        default="auto",
        choices=FORMATS,
        help="native: Llama/Mixtral classes; remote_code: our own modelling code (any block); auto: native if possible",
    )
    args = parse(parser, argv)
    try:
        out = export_checkpoint(args.target, args.out_dir, args.dtype, args.format)
    except Exception as e:  # one clear line instead of a traceback for bad input
        print(f"error: {e}", file=sys.stderr)
        return 2
    remote = (Path(out) / "modeling_sparse_arch.py").exists()
    how = f"from_pretrained({str(out)!r}" + (", trust_remote_code=True)" if remote else ")")
    print(f"exported {args.target} → {out} (load with transformers.AutoModelForCausalLM.{how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
