"""MoE → MoUE conversion (METHODS.md §2, "progressive conversion"; the recipe is a reconstruction [RECON]).

    python -m recipes.moue.convert ckpt=<MoE run folder or .pt> out=<new run folder> [key=value ...]

The universal pool is the union of the source layers' experts (layer ℓ's expert e becomes pool
expert ℓ·E + e) and layer ℓ's window starts as exactly its own E experts (window_size = stride = E),
so the converted model computes the same function as the MoE (checked on a random batch unless
``check=false``). Router rows of the experts a layer cannot reach yet, and the router's trajectory
columns, start at zero: widening lets new experts in at logit 0 and the trajectory state starts
with no influence. Everything else (embeddings, attention, norms) is copied.

The new run folder gets a checkpoint at the source's step, with the source's data-sampler and RNG
state, so continued training sees the same batches and learning-rate schedule as continuing the
MoE itself (``python train.py <the MoE's arguments> trainer.max_steps=<more>``). Options:

- ``optimizer=carry`` (default): AdamW moments are moved along with their weights (zero for the new
  router entries); ``fresh``: empty optimizer state.
- ``train=true``: train the converted run to ``trainer.max_steps`` right away. Without ``ckpt=``,
  ``out=<folder> train=true trainer.max_steps=N`` continues an existing converted run from its saved
  config; ``python train.py run_dir=<folder> trainer.max_steps=N`` does the same (it trains the config saved
  in the folder, training/run_config.py).
- ``check=false``: skip the identity check.
- any other ``a.b.c=value`` overrides the converted config, e.g. the widening schedule
  ``model.ffn.widen_to=16 model.ffn.widen_steps=100`` (``model.ffn.widen_start`` defaults to the
  checkpoint's step, i.e. widening begins right after conversion), ``trainer.max_steps=450``.

Legend: L layers, E experts per source layer, M = L·E pool experts, D d_model, Z trajectory dim.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from arch.ffn.moe import MoEFFN
from arch.ffn.universal import POOL_NAME, UniversalMoEFFN
from arch.model import LanguageModel
from training.checkpoint import files as ckpt
from training.checkpoint.load import load_model_weights
from training.checkpoint.sharded import load_model_and_optimizer
from training.config import ConfigError, validate
from training.distributed.parallel import Parallel
from training.optim import build_optimizer

MOUE_YAML = Path(__file__).resolve().parents[2] / "conf" / "model" / "ffn" / "moue.yaml"
SUPPORTED_SOURCES = ("moe", "emoe")


def moue_options(moe_ffn: dict, moe: MoEFFN, n_layers: int) -> dict:
    """The ``model.ffn`` node of the converted model: moue.yaml's defaults, windows = each layer's experts."""
    for key, ok, allowed in (
        ("router", moe_ffn.get("router", "linear") == "linear", "linear"),
        ("n_shared_experts", not moe_ffn.get("n_shared_experts"), "0"),
        ("capacity_factor", moe_ffn.get("capacity_factor") is None, "null (dropless)"),
    ):
        if not ok:
            raise ConfigError(
                f"model.ffn.{key}={moe_ffn.get(key)!r}: MoE → MoUE conversion supports only {key}={allowed}"
            )
    options = yaml.safe_load(MOUE_YAML.read_text())
    options.update(
        n_universal=moe.E * n_layers,
        n_local=0,
        top_k=moe.top_k,
        expert_hidden=moe.F,
        topology="rotational",
        window_size=moe.E,
        window_stride=moe.E,
        scoring=moe.scoring,
        renormalize=moe.renormalize,
        balance_loss_coef=moe_ffn.get("balance_loss_coef", 0.01),
        z_loss_coef=moe_ffn.get("z_loss_coef", 0.0),
        backend=moe_ffn.get("backend", "auto"),
    )
    return options


def apply_overrides(config: dict, overrides: dict[str, str]) -> dict:
    """Set dotted keys (values parsed as YAML); unknown keys are caught later by ``validate``."""
    for dotted, raw in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return config


def layer_modules(model: LanguageModel, cls: type) -> dict[int, tuple[str, Any]]:
    """{layer index: (module name, module)} for every FFN of class ``cls``."""
    return {m.layer_idx: (name, m) for name, m in model.named_modules() if isinstance(m, cls)}


def transfer(
    src: LanguageModel, dst: LanguageModel, get: Callable[[torch.Tensor], torch.Tensor | None], base: dict
) -> dict:
    """dst tensors assembled from src tensors: ``get(src_param)`` picks what moves (the weight, an
    Adam moment); ``base`` holds each dst tensor's starting value (dst init, or zeros).

    Non-FFN parameters map by name; layer ℓ's experts fill pool rows [ℓE, (ℓ+1)E); its router
    fills the same rows of its (or the shared) router over the first D input columns.
    """
    moes, moues = layer_modules(src, MoEFFN), layer_modules(dst, UniversalMoEFFN)
    out = {name: t.clone() for name, t in base.items()}
    routers = [f"shared.modules_by_name.{POOL_NAME}.router_MI"] + [f"{n}.router.weight" for n, _ in moues.values()]
    for name in routers:  # rows and trajectory columns with no source stay at zero
        if name in out:
            out[name].zero_()
    moe_prefixes = tuple(f"{name}." for name, _ in moes.values())
    for name, p in src.named_parameters():
        if not name.startswith(moe_prefixes) and (value := get(p)) is not None:
            out[name] = value.clone()
    pool = f"shared.modules_by_name.{POOL_NAME}"
    for layer, (_, moe) in moes.items():
        dst_name, moue = moues[layer]
        rows = slice(layer * moe.E, (layer + 1) * moe.E)
        router = f"{pool}.router_MI" if moue.router is None else f"{dst_name}.router.weight"
        for dst_key, dst_index, src_param in (
            (f"{pool}.w_in_MDH", rows, moe.w_in_EDH),
            (f"{pool}.w_out_MFD", rows, moe.w_out_EFD),
            (router, (rows, slice(0, moe.d_model)), moe.router.proj.weight),
        ):
            if (value := get(src_param)) is not None:
                out[dst_key][dst_index] = value
    return out


def convert_model(src: LanguageModel, dst: LanguageModel) -> None:
    """Load ``dst`` (a MoUE model) with the weights of ``src`` (a MoE model with linear routers)."""
    moes = layer_modules(src, MoEFFN)
    for _, moe in moes.values():
        if moe.expert_bias_E.abs().sum() > 0:
            raise ConfigError(
                "the source MoE has non-zero aux-loss-free biases (bias_update_rate > 0); MoUE has no such bias"
            )
    state = dst.state_dict()
    params = dict(dst.named_parameters())
    new = transfer(src, dst, lambda p: p.detach(), {k: state[k] for k in params})
    src_state = src.state_dict()
    moe_prefixes = tuple(f"{name}." for name, _ in moes.values())
    buffers = {
        k: v for k, v in src_state.items() if k not in dict(src.named_parameters()) and not k.startswith(moe_prefixes)
    }
    dst.load_state_dict({**state, **buffers, **new})


def convert_optimizer(
    src: LanguageModel, dst: LanguageModel, src_opt: torch.optim.Optimizer, dst_opt: torch.optim.Optimizer
) -> None:
    """Move AdamW moments with their weights; new router entries start at zero moments."""
    params = dict(dst.named_parameters())
    zeros = {k: torch.zeros_like(p) for k, p in params.items()}
    steps = [s["step"] for s in src_opt.state.values() if "step" in s]
    if not steps:
        return
    touched = transfer(src, dst, lambda p: torch.ones_like(p) if p in src_opt.state else None, zeros)
    moments = {
        key: transfer(src, dst, lambda p, key=key: src_opt.state[p][key] if p in src_opt.state else None, zeros)
        for key in ("exp_avg", "exp_avg_sq")
    }
    for name, p in params.items():
        if touched[name].any():  # params with no source (trajectory embeddings) start fresh
            dst_opt.state[p] = {
                "step": steps[0].clone(),
                "exp_avg": moments["exp_avg"][name],
                "exp_avg_sq": moments["exp_avg_sq"][name],
            }


def convert(
    source: str | Path,
    out: str | Path,
    overrides: dict[str, str] | None = None,
    optimizer: str = "carry",
    check: bool = True,
) -> Path:
    """Write ``out``/checkpoints/step_<source step>.pt holding the converted MoUE model. Returns its path."""
    if optimizer not in ("carry", "fresh"):
        raise ConfigError(f"optimizer={optimizer!r} is invalid; allowed: carry | fresh")
    out, overrides = Path(out), dict(overrides or {})
    if ckpt.list_checkpoints(out):
        raise ckpt.CheckpointError(
            f"{out} already holds checkpoints; convert into a new folder (nothing was overwritten)"
        )
    path, state = _load(source)
    src_root = validate(state["config"])
    if src_root.model.ffn["name"] not in SUPPORTED_SOURCES:
        raise ConfigError(
            f"{path} has model.ffn.name={src_root.model.ffn['name']!r}; conversion needs one of "
            f"{list(SUPPORTED_SOURCES)}"
        )
    src = LanguageModel(src_root.model)
    src_opt = build_optimizer(src, src_root.optim, "cpu")
    if optimizer == "carry":  # a .pt file or a sharded (DCP) folder, read by the verified loaders
        load_model_and_optimizer(state, src, src_opt, Parallel())
    else:
        load_model_weights(state, src)
    moe = next(m for _, m in layer_modules(src, MoEFFN).values())

    config = copy.deepcopy(state["config"])
    config["model"]["ffn"] = moue_options(src_root.model.ffn, moe, src_root.model.n_layers)
    config["model"]["ffn"]["widen_start"] = state["step"]  # widening begins after conversion unless overridden
    config["run_dir"] = str(out)
    dst_root = validate(apply_overrides(config, overrides))
    torch.manual_seed(dst_root.seed)  # the parameters with no source (trajectory embeddings) are reproducible
    dst = LanguageModel(dst_root.model)
    convert_model(src, dst)
    if check:
        _check_identical(src, dst, dst_root)

    dst_opt = build_optimizer(dst, dst_root.optim, "cpu")
    if optimizer == "carry":
        convert_optimizer(src, dst, src_opt, dst_opt)
    payload = {
        "model": dst.state_dict(),
        "optimizer": dst_opt.state_dict(),
        "schedule": {"name": dst_root.schedule.name, "step": state["step"]},
        "sampler": state["sampler"],
        "rng": state["rng"],
        "nonfinite_skipped": state.get("nonfinite_skipped", 0),
        "config": config,
        "converted_from": str(path),
    }
    written = ckpt.save_checkpoint(out, state["step"], payload, dst_root.trainer.keep_last)
    from omegaconf import OmegaConf

    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    return written


@torch.no_grad()
def _check_identical(src: LanguageModel, dst: LanguageModel, root) -> None:
    """Raise if the converted model's logits differ from the source's on a random batch."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, root.model.vocab_size, (2, min(64, root.data.seq_len)), generator=g)
    src.eval(), dst.eval()
    a, b = src(idx).logits, dst(idx).logits
    diff = (a - b).abs().max().item()
    if not diff <= 1e-4 * max(1.0, a.abs().max().item()):
        raise RuntimeError(f"converted model differs from the source MoE: max |Δ logits| = {diff:.3g}")
    print(f"identity check: max |Δ logits| = {diff:.3g} (converted vs source, before widening)")


def _load(source: str | Path) -> tuple[Path, dict]:
    source = Path(source)
    if source.is_dir():
        found = ckpt.find_resume_checkpoint(source)
        if found is None:
            raise ckpt.CheckpointError(f"no usable checkpoint in {source / ckpt.CHECKPOINT_DIR}")
        return found
    return source, ckpt.load_checkpoint(source)


def continue_training(out: str | Path, overrides: dict[str, str] | None = None) -> dict:
    """Train a converted run folder to ``trainer.max_steps`` from its saved config (+ overrides)."""
    from training.trainer import train

    out = Path(out)
    if not (out / "config.yaml").is_file():
        raise FileNotFoundError(f"{out / 'config.yaml'} does not exist; convert first (ckpt=... out={out})")
    config = apply_overrides(yaml.safe_load((out / "config.yaml").read_text()), dict(overrides or {}))
    config["run_dir"] = str(out)
    found = ckpt.find_resume_checkpoint(out)
    if found is not None and config["trainer"]["max_steps"] <= found[1]["step"]:
        raise ConfigError(
            f"trainer.max_steps={config['trainer']['max_steps']} must exceed the checkpoint's step "
            f"{found[1]['step']} to continue training"
        )
    return train(config)


def build_parser():
    from training.tool_args import parse_bool, tool_parser

    parser = tool_parser(
        "python -m recipes.moue.convert",
        __doc__.split("\n\n")[0],
        epilog="Any other key=value (e.g. model.ffn.widen_to=16 trainer.max_steps=450) overrides the converted config.",
    )
    parser.add_argument(
        "--ckpt",
        default=None,
        help="the MoE run folder or .pt to convert (omit with train=true to continue a converted run)",
    )
    parser.add_argument("--out", required=True, help="the new run folder")
    parser.add_argument(
        "--optimizer",
        default="carry",
        choices=["carry", "fresh"],
        help="move AdamW moments with their weights, or start empty",
    )
    parser.add_argument(
        "--train", type=parse_bool, default=False, help="train the converted run to trainer.max_steps right away"
    )
    parser.add_argument(
        "--check", type=parse_bool, default=True, help="check that the converted model computes the MoE's function"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    from training.cli import report_errors
    from training.tool_args import parse

    with report_errors():
        args, words = parse(build_parser(), argv, overrides=True)
        overrides = dict(w.split("=", 1) for w in words)
        if args.ckpt is not None:
            written = convert(args.ckpt, args.out, overrides, args.optimizer, args.check)
            print(f"converted {args.ckpt} → {written}")
            overrides = {}  # already in the converted run's config
        elif not args.train:
            raise ConfigError("give ckpt=<MoE run folder or .pt> to convert, or train=true to continue a converted run")
        if args.train:
            continue_training(args.out, overrides)


if __name__ == "__main__":
    main()
