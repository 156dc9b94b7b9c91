"""The config schema: one dataclass per section of ``conf/`` (model, data, optim, schedule, trainer,
logger, elastic) and ``RootConfig`` holding them. Imports neither torch nor the model code.

Defaults and types only; ``training.config.validate`` turns a composed config into these dataclasses
and checks every key, type and range.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class ModelConfig:
    name: str = "dense_tiny"
    vocab_size: int | None = None  # None → the tokenizer's vocabulary size
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    attention: dict = field(default_factory=lambda: {"name": "mha"})
    ffn: dict = field(default_factory=lambda: {"name": "swiglu"})
    depth: dict = field(default_factory=lambda: {"name": "plain"})


@dataclass
class TokenizerConfig:
    kind: Literal["bpe", "bytes", "hf"] = "bpe"
    vocab_size: int = 2048
    name: str | None = None


@dataclass
class HFDataConfig:
    path: str | None = None
    name: str | None = None
    split: str = "train"
    data_files: Any = None
    streaming: bool = True
    max_docs: int | None = None
    max_bytes: int | None = 20_000_000


@dataclass
class SyntheticConfig:
    task: Literal["assoc_recall", "mod_add"] = "assoc_recall"
    num_train: int = 20000
    num_val: int = 1000
    n_keys: int = 16
    modulus: int = 97
    seed: int = 0


@dataclass
class DataConfig:
    source: Literal["embedded", "files", "hf", "synthetic"] = "embedded"
    name: str = "shakespeare"
    seq_len: int = 256
    val_fraction: float = 0.05
    cache_dir: str = ".cache/data"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    paths: list = field(default_factory=list)
    text_field: str = "text"
    hf: HFDataConfig = field(default_factory=HFDataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class OptimConfig:
    name: Literal["adamw"] = "adamw"
    lr: float = 1e-3
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # final lr / peak lr
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly


@dataclass
class TrainerConfig:
    max_steps: int = 500
    batch_size: int = 16
    grad_accum: int = 1
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 10
    checkpoint_every: int = 200
    keep_last: int = 3
    resume: str = "auto"  # auto | none | <path to a checkpoint file>
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    nonfinite: Literal["skip", "abort"] = "skip"
    progress: bool = True
    sample_prompt: str = "ROMEO:"
    sample_tokens: int = 200
    sample_temperature: float = 0.8
    sample_top_k: int | None = 50
    export_safetensors: bool = True
    threads: int | None = None  # CPU intra-op threads; None = torch's default
    # Several processes (torchrun / SLURM): training/distributed/parallel.py.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    expert_parallel: int = 1  # experts split over this many ranks (must divide the process count)
    checkpoint_format: Literal["auto", "torch", "dcp"] = "auto"  # auto: dcp with several processes
    checkpoint_async: bool = False  # dcp only: write in the background while training continues


@dataclass
class LoggerConfig:
    name: Literal["none", "wandb"] = "none"
    project: str = "sparse-arch"
    entity: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online iff an API key is configured
    tags: list = field(default_factory=list)


@dataclass
class ElasticConfig:
    """ERNIE-style elastic training (training/elastic.py). Probabilities are of the FULL setting."""

    enabled: bool = False
    mode: Literal["single", "full_plus_sub"] = "single"
    depth_full_prob: float = 0.75
    depth_min: int = 1
    depth_drop: Literal["tail", "random"] = "tail"
    width_full_prob: float = 0.8
    subset_sizes: list = field(default_factory=list)  # empty: n_experts // 2
    topk_full_prob: float = 0.8
    topk_min: int = 1
    topk_max: int | None = None  # null: top_k - 1


@dataclass
class RootConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    seed: int = 0
    run_dir: str = "runs/default"
    experiment: str | None = None
