"""Export any model of ours as a Hugging Face package that ``transformers`` loads with ``trust_remote_code``.

Runs whose blocks have no stock ``transformers`` class (DHA, MoUE, MoHD, looped / recurrent / ITT /
SGT depth, EMoE's k' at inference, …) are written as a folder that carries its own modelling code:

    config.json                   model_type sparse_arch, auto_map → the two files below, our model config
    configuration_sparse_arch.py  SparseArchConfig (a PretrainedConfig holding the model config dict)
    modeling_sparse_arch.py       SparseArchForCausalLM: a PreTrainedModel around arch.model.LanguageModel
    sparse_arch_src/arch, kernels the framework's model code, copied from this checkout (the modelling
                                  file imports it from here, so the folder works without the framework)
    model.safetensors             the weights ("model." + our state-dict names)
    tokenizer files, README.md    the tokenizer (when it has a Hugging Face form) and a model card

``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` then computes our model's
logits exactly (the same code runs; tests/training/export/test_remote_code.py checks every
registered block within 1e-5 in fp32).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIR = "sparse_arch_src"
EXTRA_STATE = "sparse_arch_extra_state.json"  # non-tensor module state (get_extra_state), e.g. SGT's loop schedule
PACKAGES = ("arch", "kernels")

CONFIGURATION = '''"""SparseArchConfig: the model config of a sparse-arch run (training.export.remote_code wrote it)."""
from transformers import PretrainedConfig


class SparseArchConfig(PretrainedConfig):
    model_type = "sparse_arch"

    def __init__(self, sparse_arch_model=None, **kwargs):
        self.sparse_arch_model = dict(sparse_arch_model or {})
        kwargs.setdefault("tie_word_embeddings", bool(self.sparse_arch_model.get("tie_embeddings", True)))
        super().__init__(**kwargs)
'''

MODELING = '''"""SparseArchForCausalLM: arch.model.LanguageModel behind the transformers API (written by
training.export.remote_code). The framework's model code travels in ``sparse_arch_src/`` beside this
file's original folder; an installed framework is used when the bundled copy cannot be found."""
import importlib
import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_sparse_arch import SparseArchConfig


def _language_model_class(config):
    source = os.path.join(str(getattr(config, "_name_or_path", "") or ""), "{source_dir}")
    if os.path.isdir(source) and source not in sys.path:
        sys.path.insert(0, source)
    return importlib.import_module("arch.model").LanguageModel


class SparseArchForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SparseArchConfig
    base_model_prefix = "model"
    _no_split_modules = []

    def __init__(self, config):
        super().__init__(config)
        LanguageModel = _language_model_class(config)
        self.model = LanguageModel(SimpleNamespace(**config.sparse_arch_model))
        self.post_init()

    def _init_weights(self, module):
        """The weights come from model.safetensors; LanguageModel initialised everything else itself."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        model.restore_computed_buffers()
        model.restore_extra_state()
        return model

    def state_dict(self, *args, **kwargs):
        """Tensors only: non-tensor module state travels in {extra_state} (transformers handles tensors)."""
        state = super().state_dict(*args, **kwargs)
        for key in [k for k in state if k.endswith("_extra_state")]:
            del state[key]
        return state

    def restore_extra_state(self):
        """Non-tensor module state (``get_extra_state``, e.g. SGT's loop schedule) from {extra_state}."""
        path = os.path.join(str(getattr(self.config, "_name_or_path", "") or ""), "{extra_state}")
        if not os.path.isfile(path):
            return
        with open(path) as f:
            for name, value in json.load(f).items():
                owner = name[: -len("._extra_state")] if name.endswith("._extra_state") else ""
                (self.model.get_submodule(owner) if owner else self.model).set_extra_state(value)

    @torch.no_grad()
    def restore_computed_buffers(self):
        """Buffers that are not in the state dict (RoPE tables, running statistics) are computed by the
        constructor; transformers builds the model on the meta device and leaves them unset, so they are
        taken from a freshly constructed copy."""
        fresh = type(self.model)(self.model.cfg)
        saved = set(self.model.state_dict())
        device = next(self.model.parameters()).device
        for name, buffer in fresh.named_buffers():
            if name in saved:
                continue
            owner, _, leaf = name.rpartition(".")
            (self.model.get_submodule(owner) if owner else self.model)._buffers[leaf] = buffer.to(device)

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        """(B, T) ids → logits (B, T, V); with labels (B, T), the next-token loss (HF's shift convention).
        The model attends causally over the whole row: left padding is not supported."""
        logits = self.model(input_ids).logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {{"input_ids": input_ids}}  # no cache: every step recomputes the whole prefix
'''

CARD = """---
library_name: transformers
tags: [sparse-arch, {tags}]
---
# {name}

A language model trained with the sparse-arch framework and exported with
`python -m training.export.hf` (its own modelling code: load it with `trust_remote_code=True`).

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{folder}", trust_remote_code=True)
```

## Model

{model}

## Training

{training}
"""


def _copy_sources(out_dir: Path) -> None:
    for package in PACKAGES:
        target = out_dir / SOURCE_DIR / package
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(ROOT / package, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def model_card(model, run_config: dict | None, final_metrics: dict | None, folder: str) -> str:
    """README.md: what the model is, how to load it, and the training config, data, steps and final metrics."""
    cfg = vars(model.cfg) if not dataclasses.is_dataclass(model.cfg) else dataclasses.asdict(model.cfg)
    blocks = [cfg["attention"]["name"], cfg["ffn"]["name"], cfg["depth"]["name"]]
    params = sum(p.numel() for p in model.parameters())
    model_text = (
        f"- blocks: attention `{blocks[0]}`, FFN `{blocks[1]}`, depth `{blocks[2]}`\n"
        f"- {cfg['n_layers']} layers, d_model {cfg['d_model']}, {cfg['n_heads']} heads, vocabulary "
        f"{cfg['vocab_size']}, "
        f"context {cfg['max_seq_len']}\n- {params / 1e6:.2f}M parameters\n\n"
        f"```json\n{json.dumps(cfg, indent=1, default=str)}\n```"
    )
    if run_config:
        trainer, data = run_config.get("trainer", {}), run_config.get("data", {})
        metrics = "\n".join(f"- {k}: {v}" for k, v in (final_metrics or {}).items()) or "- (no evaluation recorded)"
        training = (
            f"- data: `{data.get('source', '?')}` (seq_len {data.get('seq_len', '?')}, tokenizer "
            f"{data.get('tokenizer', {}).get('kind', '?')})\n- steps: {trainer.get('max_steps', '?')}, batch size "
            f"{trainer.get('batch_size', '?')}, seed {run_config.get('seed', '?')}\n- optimizer: "
            f"{json.dumps(run_config.get('optim', {}))}\n\nFinal metrics:\n\n{metrics}"
        )
    else:
        training = "(no run config was available to the exporter)"
    return CARD.format(
        tags=", ".join(blocks),
        name=cfg.get("name", "sparse-arch model"),
        folder=folder,
        model=model_text,
        training=training,
    )


def export_remote_code(
    model,
    out_dir: str | Path,
    tokenizer=None,
    dtype: torch.dtype = torch.float32,
    run_config: dict | None = None,
    final_metrics: dict | None = None,
) -> Path:
    """Write the trust_remote_code package of ``model`` (any registered blocks) into ``out_dir``."""
    from safetensors.torch import save_file

    from training.export.tokenizer_files import save_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    model_config = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg))
    config = {
        "model_type": "sparse_arch",
        "architectures": ["SparseArchForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_sparse_arch.SparseArchConfig",
            "AutoModelForCausalLM": "modeling_sparse_arch.SparseArchForCausalLM",
        },
        "sparse_arch_model": model_config,
        "vocab_size": model_config["vocab_size"],
        "tie_word_embeddings": bool(model_config.get("tie_embeddings", True)),
        "torch_dtype": str(dtype).replace("torch.", ""),
        # read by transformers' generation utilities; the model keeps no transformers cache
        "num_hidden_layers": model_config["n_layers"],
        "hidden_size": model_config["d_model"],
        "num_attention_heads": model_config["n_heads"],
        "max_position_embeddings": model_config["max_seq_len"],
        "use_cache": False,
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    (out_dir / "configuration_sparse_arch.py").write_text(CONFIGURATION)
    (out_dir / "modeling_sparse_arch.py").write_text(MODELING.format(source_dir=SOURCE_DIR, extra_state=EXTRA_STATE))
    _copy_sources(out_dir)
    # every state-dict entry under its own name; tied weights (shared storage, which safetensors refuses)
    # are written as copies, so loading fills both whether or not transformers keeps the tie
    state, seen, extra = {}, set(), {}
    for name, tensor in model.state_dict().items():
        if not isinstance(tensor, torch.Tensor):  # a module's get_extra_state() (e.g. SGT's schedule): JSON
            extra[name] = tensor
            continue
        tensor = tensor.detach().to(dtype if tensor.is_floating_point() else tensor.dtype).cpu()
        if tensor.numel() and tensor.data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        state[f"model.{name}"] = tensor.contiguous()
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / EXTRA_STATE).write_text(json.dumps(extra, indent=1) + "\n")
    if tokenizer is not None:
        save_tokenizer(tokenizer, out_dir, model_config["max_seq_len"])
    (out_dir / "README.md").write_text(model_card(model, run_config, final_metrics, str(out_dir)))
    return out_dir
